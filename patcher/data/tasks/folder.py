"""A user's dataset in ImageFolder layout, "folder:PATH" (PATH/train/<class>/..., PATH/val/..., PATH/test/...)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

import patcher.data.tasks.checks as checks
from patcher.base.errors import PatcherError
from patcher.base.progress import console
from patcher.data.tasks.loaders import torchvision_class
from patcher.data.tasks.splits import train_test_indices
from patcher.data.tasks.task import Task
from patcher.data.tasks.user_data import Spec, class_names, read_templates
from patcher.data.tasks.views import ImageView

PREFIX = "folder:"
LAYOUT = "train/<class>/<image>, optionally val/<class>/<image> and test/<class>/<image>"


def folder_task(spec: Spec, name: str) -> Task:
    """The task of a folder dataset: class names from train/'s folders (or classnames.txt's `FOLDER: NAME` map),
    templates.txt optional, val/ and test/ used when present."""
    path = spec.location
    folders, names = class_names(class_folders(path), path, "class folder")
    parts = tuple(part for part in ("train", "val", "test") if part == "train" or (path / part).is_dir())
    return Task(name, names, read_templates(path), FolderLayout(path, folders, parts).load, parts=parts,
                source=spec.source, checks_files=True)


def class_folders(path: Path) -> tuple[str, ...]:
    """The sorted class folder names under PATH/train (torchvision's ImageFolder order)."""
    train = path / "train"
    if not train.is_dir():
        raise PatcherError(f"folder dataset {path} has no train/ folder: expected {LAYOUT}")
    classes = sorted(entry.name for entry in os.scandir(train) if entry.is_dir())
    if not classes:
        raise PatcherError(f"folder dataset {path} has no class folders in train/: expected {LAYOUT}")
    return tuple(classes)


@dataclass(frozen=True, eq=False)  # held by a Task's loader, never compared
class FolderLayout:
    """A folder dataset as found: its PATH, the class folders (in label order) and the parts it has."""

    path: Path
    classes: tuple[str, ...]
    parts: tuple[str, ...]

    def load(self, part: str, root: Path, download: bool, bad_images: checks.SkipReport | None = None) -> Dataset:
        """PATH/<part>; without PATH/test, a seeded stratified 4:1 split of PATH/train (`root` and `download` are
        the Loader's, unused: the folder is where PATH says)."""
        if part in self.parts and (part != "train" or "test" in self.parts):
            return open_folder(self.path, part, self.classes, bad_images)[0]
        train, labels = open_folder(self.path, "train", self.classes, bad_images)
        return ImageView(train, train_test_indices(labels, weights=(4, 1))[part])


def open_folder(path: Path, part: str, classes: tuple[str, ...],
                bad_images: checks.SkipReport | None = None) -> tuple[ImageView, list[int]]:
    """PATH/<part> as an ImageFolder with labels numbered by `classes`: (dataset, labels).

    Every image file is checked up front (`checks.find_bad_images`): unusable ones are refused, naming the
    first few, or with `bad_images` left out and counted there; an empty class folder is refused either way.
    """
    image_folder = torchvision_class("ImageFolder")
    try:
        data = image_folder(str(path / part), allow_empty=True)
    except OSError as error:
        raise PatcherError(f"cannot read folder dataset {path / part} ({error}): expected {LAYOUT}") from error
    unknown = sorted(set(data.classes) - set(classes))
    if unknown:
        raise PatcherError(f"{path / part} has class folders that train/ lacks: {', '.join(unknown)}")
    if not data.samples:
        raise PatcherError(f"folder dataset {path} has no images in {part}/: expected {LAYOUT}")
    dropped = drop_bad_images(data, path / part, bad_images)
    _refuse_empty_classes(data, path / part, dropped > 0)
    index = [classes.index(name) for name in data.classes]
    return ImageView(data, target=index.__getitem__), [index[target] for target in data.targets]


def drop_bad_images(data: Any, folder: Path, report: checks.SkipReport | None) -> int:
    """Refuse (or, given a report, leave out and count there) unusable image files of `data.samples`
    [(path, label)]; how many were left out."""
    bad = checks.find_bad_images(sample[0] for sample in data.samples)
    if bad and report is None:
        raise PatcherError(f"{len(bad)} of {len(data.samples)} image files in {folder} cannot be used: "
                           f"{checks.describe(bad)}: fix or remove them, or pass --skip-bad-images to leave "
                           "them out")
    if bad:
        report.skipped[str(folder)] = bad
        dropped = {path for path, _ in bad}
        data.samples = [sample for sample in data.samples if sample[0] not in dropped]
        data.imgs = data.samples
        data.targets = [target for _, target in data.samples]
        console.print(f"[yellow]warning:[/] left out {len(bad)} unusable image files in {folder} "
                      f"(--skip-bad-images): {checks.describe(bad)}")
    return len(bad)


def _refuse_empty_classes(data: Any, folder: Path, skipped: bool) -> None:
    counts = Counter(data.targets)
    empty = [name for number, name in enumerate(data.classes) if counts[number] == 0]
    if empty:
        usable = " usable" if skipped else ""
        shown = ", ".join(str(folder / name) for name in empty[:checks.SHOWN])
        more = f" and {len(empty) - checks.SHOWN} more" if len(empty) > checks.SHOWN else ""
        raise PatcherError(f"class folder {shown}{more} has no{usable} images: add images, or remove the folder "
                           "(and its line in classnames.txt)")
