"""Datasets stored as ImageFolder trees (<class>/<image>) that torchvision has no dedicated class for."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

import patcher.data.tasks.classnames as classnames
from patcher.base.errors import PatcherError
from patcher.data.tasks.loaders import check_classes, torchvision_class
from patcher.data.tasks.missing import open_dataset
from patcher.data.tasks.splits import train_test_indices
from patcher.data.tasks.views import ImageView

IMAGENET_CLASSES = 1000


def load_resisc45(part: str, root: Path, download: bool) -> Dataset:
    """NWPU-RESISC45 from root/resisc45/NWPU-RESISC45/<class>/*.jpg, split 4:1 (seeded, stratified)."""
    where = root / "resisc45"
    folder = torchvision_class("ImageFolder")
    data = open_dataset(
        lambda: folder(str(where / "NWPU-RESISC45")),
        title="RESISC45",
        where=where,
        expected="NWPU-RESISC45/<class>/<image>.jpg for its 45 class folders airplane ... wetland",
        download=download,
        downloadable=False,
    )
    check_classes(data.classes, classnames.RESISC45_FOLDERS, "RESISC45", where)
    return ImageView(data, train_test_indices(data.targets, weights=(4, 1))[part])


def load_imagenet(part: str, root: Path, download: bool) -> Dataset:
    """ImageNet-1k from root/imagenet/{train,val}/<wnid>/*.JPEG; its val images are the test part."""
    where = root / "imagenet"
    subfolder = "train" if part == "train" else "val"
    folder = torchvision_class("ImageFolder")
    data = open_dataset(
        lambda: folder(str(where / subfolder)),
        title="ImageNet",
        where=where,
        expected="train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, 1000 wnid folders each (ImageFolder layout)",
        download=download,
        downloadable=False,
    )
    if len(data.classes) != IMAGENET_CLASSES:
        raise PatcherError(
            f"ImageNet under {where / subfolder} has {len(data.classes)} class folders; expected the "
            f"{IMAGENET_CLASSES} wnid folders (n01440764 ... n15075141) so that labels match the class names"
        )
    return ImageView(data)
