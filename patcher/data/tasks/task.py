"""A task: class names, prompt templates, and a loader for its data, split into train / val / test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.data.tasks.checks import SkipReport
from patcher.data.tasks.paths import resolve_data_root
from patcher.data.tasks.splits import holdout_indices
from patcher.data.tasks.views import ImageView

# A loader returns one part of a task's data ("train", "test", or an extra part such as digits'
# "pretrain") as (RGB PIL image, int label) items, given the data root and whether it may download; the loader of a
# user's image files (`Task.checks_files`) also takes the report its unusable files go to (None: refuse them).
Loader = Callable[..., Dataset]

OFFICIAL_PARTS = ("train", "test")
TEST_ONLY = ("test",)  # an evaluation set: its held-out split is a seeded part of its test images


def is_template(text: str) -> bool:
    """True for a prompt template: exactly one "{}" for the class name and no other braces."""
    rest = text.replace("{}", "", 1)
    return "{}" in text and "{" not in rest and "}" not in rest


@dataclass(frozen=True)
class HeadColumns:
    """A head taken from another task's: the columns of `parent`'s zero-shot head this task scores with (the
    200 ImageNet classes of ImageNet-R, as WiSE-FT restricts the 1,000-class logits)."""

    parent: str
    columns: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """A classification task. Split "val" is a seeded holdout of the train part ("train" excludes it), unless the
    loader has a "val" part of its own (a user's val/ folder). A task
    without a train part (an evaluation set such as ImageNet-R) holds out a seeded part of its test images instead.

    `classnames` name the head's columns (what the prompts fill in); `labels`, when given, are the classes the
    dataset's labels count, with `column_labels` the label of each column (ObjectNet: several ImageNet columns
    per ObjectNet class)."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    load: Loader = field(repr=False, compare=False)
    parts: tuple[str, ...] = field(default=OFFICIAL_PARTS, repr=False, compare=False)
    head_from: HeadColumns | None = field(default=None, repr=False, compare=False)
    labels: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    column_labels: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    source: str | None = field(default=None, repr=False, compare=False)  # where a user's dataset is: "folder:/abs"
    checks_files: bool = field(default=False, repr=False, compare=False)  # its loader takes a bad-image report

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
        if self.head_from is not None and len(self.head_from.columns) != len(self.classnames):
            raise PatcherError(f"task {self.name}: {len(self.head_from.columns)} head columns for "
                               f"{len(self.classnames)} class names")
        if (self.labels is None) != (self.column_labels is None):
            raise PatcherError(f"task {self.name}: labels and column_labels go together")
        if self.column_labels is not None and (len(self.column_labels) != len(self.classnames)
                                               or set(self.column_labels) != set(range(len(self.labels or ())))):
            raise PatcherError(f"task {self.name}: column_labels must give each column a label, every label a column")

    @property
    def label_names(self) -> tuple[str, ...]:
        """The classes the dataset's labels count, in label order."""
        return self.labels if self.labels is not None else self.classnames

    @property
    def trainable(self) -> bool:
        """Whether the task has training images (an evaluation set has none)."""
        return "train" in self.parts

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names dataset() accepts: train (when the task has one), val, test, then any extra parts."""
        train = ("train",) if self.trainable else ()
        extra = (part for part in self.parts if part not in (*OFFICIAL_PARTS, "val"))
        return (*train, "val", "test", *extra)

    def dataset(self, split: str, data_root: Path | str | None = None, download: bool = False,
                bad_images: SkipReport | None = None) -> Dataset:
        """Items (RGB PIL image, int label) of one split, read from under the data root; a user's unusable image
        files are refused, or with `bad_images` left out and counted there."""
        if split not in self.splits:
            raise PatcherError(f"task {self.name} has no split {split!r}; its splits are {', '.join(self.splits)}")
        root = resolve_data_root(data_root)
        if (split not in ("train", "val") and self.trainable) or "val" in self.parts:  # a part of its own: val/
            return self.part(split, root, download, bad_images)
        held_from = "train" if self.trainable else "test"  # an evaluation set holds out part of its test images
        full = self.part(held_from, root, download, bad_images)
        kept, held_out = holdout_indices(len(full))
        return ImageView(full, held_out if split == "val" else kept)

    def part(self, part: str, root: Path, download: bool = False, bad_images: SkipReport | None = None) -> Dataset:
        """One part of the task's data as its loader gives it (`bad_images`: as for `dataset`)."""
        if self.checks_files:
            return self.load(part, root, download, bad_images)
        return self.load(part, root, download)
