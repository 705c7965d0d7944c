"""A task: class names, prompt templates, and a loader for its data, split into train / val / test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.data.tasks.paths import resolve_data_root
from patcher.data.tasks.splits import holdout_indices
from patcher.data.tasks.views import ImageView

# A loader returns one part of a task's data ("train", "test", or an extra part such as digits'
# "pretrain") as (RGB PIL image, int label) items, given the data root and whether it may download.
Loader = Callable[[str, Path, bool], Dataset]

OFFICIAL_PARTS = ("train", "test")


def is_template(text: str) -> bool:
    """True for a prompt template: exactly one "{}" for the class name and no other braces."""
    rest = text.replace("{}", "", 1)
    return "{}" in text and "{" not in rest and "}" not in rest


@dataclass(frozen=True)
class Task:
    """A classification task. Split "val" is a seeded holdout of the train part; "train" excludes it."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    load: Loader = field(repr=False, compare=False)
    parts: tuple[str, ...] = field(default=OFFICIAL_PARTS, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.classnames:
            raise PatcherError(f"task {self.name} has no class names")
        if not self.templates:
            raise PatcherError(f"task {self.name} has no prompt templates")
        for template in self.templates:
            if not is_template(template):
                raise PatcherError(
                    f"task {self.name}: template {template!r} must contain exactly one '{{}}' and no other braces"
                )

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names dataset() accepts: train, val, test, then any extra parts of this task."""
        return ("train", "val", "test", *(part for part in self.parts if part not in OFFICIAL_PARTS))

    def dataset(self, split: str, data_root: Path | str | None = None, download: bool = False) -> Dataset:
        """Items (RGB PIL image, int label) of one split, read from under the data root."""
        if split not in self.splits:
            raise PatcherError(f"task {self.name} has no split {split!r}; its splits are {', '.join(self.splits)}")
        root = resolve_data_root(data_root)
        if split not in ("train", "val"):
            return self.load(split, root, download)
        full_train = self.load("train", root, download)
        train_indices, val_indices = holdout_indices(len(full_train))
        return ImageView(full_train, train_indices if split == "train" else val_indices)
