"""Loaders backed by torchvision's dataset classes, each naming the on-disk layout it expects.

Every loader has the signature (part, root, download) -> Dataset of (RGB PIL image, int label) items,
plus `dataset_class`: the torchvision class to use, by name or as a class (tests pass a subclass that
skips the checksum check of the real archives, so that a small synthetic copy of the layout loads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

import patcher.data.tasks.classnames as classnames
from patcher.base.compat import import_torchvision
from patcher.base.errors import PatcherError
from patcher.data.tasks.missing import open_dataset
from patcher.data.tasks.splits import train_test_indices
from patcher.data.tasks.views import ImageView

IDX_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"


def torchvision_class(spec: str | type) -> type:
    """A class of torchvision.datasets by name, or `spec` itself when it is a class already."""
    return getattr(import_torchvision().datasets, spec) if isinstance(spec, str) else spec


def check_classes(
    found: Sequence[str], expected: Sequence[str], title: str, where: Path, *, by_name: bool = True
) -> None:
    """Raise a PatcherError unless the dataset has the expected classes (else labels would be wrong).

    With by_name=False only their number is compared (for datasets whose own names differ from CLIP's).
    """
    if list(found) == list(expected) or (not by_name and len(found) == len(expected)):
        return
    shown = ", ".join(list(found)[:5]) + (", ..." if len(found) > 5 else "")
    raise PatcherError(
        f"{title} under {where} has {len(found)} classes ({shown}); expected the {len(expected)} "
        f"of the published dataset, starting {', '.join(list(expected)[:3])}"
    )


@dataclass(frozen=True)
class TorchvisionLayout:
    """How one torchvision dataset class is opened and where its files are: enough to write its loader."""

    dataset_class: str
    title: str
    folder: str  # where the files are, under the data root
    expected: str  # the files a user must put there
    split_argument: str | None  # "train" (train=True/False), "split" (split="train"/"test"), None: no split
    root_folder: str = ""  # a sub-folder of the data root to pass as the class's root
    # (dataset, part, where) -> the part's items, for datasets without an official split; default: all items
    select: Callable[[Any, str, Path], Dataset] | None = None


def torchvision_loader(layout: TorchvisionLayout) -> Callable[..., Dataset]:
    """A loader (part, root, download, dataset_class=...) -> Dataset for a dataset torchvision reads itself."""

    def load(part: str, root: Path, download: bool, dataset_class: str | type = layout.dataset_class) -> Dataset:
        cls = torchvision_class(dataset_class)
        split = {"train": {"train": part == "train"}, "split": {"split": part}}.get(layout.split_argument or "", {})
        data = open_dataset(
            lambda: cls(str(root / layout.root_folder), download=download, **split),
            title=layout.title,
            where=root / layout.folder,
            expected=layout.expected,
            download=download,
        )
        return layout.select(data, part, root / layout.folder) if layout.select else ImageView(data)

    load.__doc__ = f"{layout.title} from root/{layout.folder} ({layout.expected})."
    return load


load_mnist = torchvision_loader(TorchvisionLayout("MNIST", "MNIST", "MNIST/raw", IDX_FILES, "train"))
load_cifar10 = torchvision_loader(TorchvisionLayout(
    "CIFAR10", "CIFAR-10", "cifar-10-batches-py", "data_batch_1 to data_batch_5, test_batch and batches.meta",
    "train"))
load_cifar100 = torchvision_loader(TorchvisionLayout(
    "CIFAR100", "CIFAR-100", "cifar-100-python", "train, test and meta", "train"))
load_stl10 = torchvision_loader(TorchvisionLayout(  # the labelled train (5,000) and test (8,000) images
    "STL10", "STL-10", "stl10_binary", "train_X.bin, train_y.bin, test_X.bin, test_y.bin and unlabeled_X.bin",
    "split"))
load_svhn = torchvision_loader(TorchvisionLayout(  # torchvision reads SVHN's label 10 as digit 0
    "SVHN", "SVHN", "svhn", "train_32x32.mat and test_32x32.mat", "split", root_folder="svhn"))
load_gtsrb = torchvision_loader(TorchvisionLayout(
    "GTSRB", "GTSRB", "gtsrb", "GTSRB/Training/<00000..00042>/*.ppm, GTSRB/Final_Test/Images/*.ppm and "
    "GT-final_test.csv", "split"))


def load_dtd(part: str, root: Path, download: bool, dataset_class: str | type = "DTD") -> Dataset:
    """DTD partition 1 from root/dtd; the train part is its train and val lists together."""
    cls = torchvision_class(dataset_class)
    where = root / "dtd"
    pieces = []
    for split in ("train", "val") if part == "train" else ("test",):
        data = open_dataset(
            lambda split=split: cls(str(root), split=split, download=download),
            title="DTD",
            where=where,
            expected="dtd/images/<class>/*.jpg and dtd/labels/{train,val,test}1.txt",
            download=download,
        )
        check_classes(data.classes, classnames.DTD, "DTD", where)
        pieces.append(data)
    return ImageView(pieces[0] if len(pieces) == 1 else ConcatDataset(pieces))


def _eurosat_part(data: Any, part: str, where: Path) -> Dataset:
    """EuroSAT has no official split: a seeded stratified 9:1 one."""
    check_classes(data.classes, list(classnames.EUROSAT_FOLDERS), "EuroSAT", where)
    return ImageView(data, train_test_indices(data.targets, weights=(9, 1))[part])


def _sun397_part(data: Any, part: str, where: Path) -> Dataset:
    """SUN397 has no split in torchvision: a seeded stratified 4:1 one over the files sorted by path."""
    check_classes(data.classes, classnames.SUN397, "SUN397", where, by_name=False)
    paths = [str(path) for path in data._image_files]  # listed in file-system order; sorted, the split is stable
    return ImageView(data, train_test_indices(data._labels, weights=(4, 1), keys=paths)[part])


load_eurosat = torchvision_loader(TorchvisionLayout(
    "EuroSAT", "EuroSAT", "eurosat", "2750/<class>/*.jpg for its 10 class folders AnnualCrop ... SeaLake", None,
    select=_eurosat_part))
load_sun397 = torchvision_loader(TorchvisionLayout(
    "SUN397", "SUN397", "SUN397", "ClassName.txt and <letter>/<class>/sun_*.jpg", None, select=_sun397_part))


def load_cars(part: str, root: Path, download: bool, dataset_class: str | type = "StanfordCars") -> Dataset:
    """Stanford Cars from root/stanford_cars (torchvision's layout; its download URL no longer works)."""
    cls = torchvision_class(dataset_class)
    where = root / "stanford_cars"
    data = open_dataset(
        lambda: cls(str(root), split=part, download=False),
        title="Stanford Cars",
        where=where,
        expected="devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test/ and "
        "cars_test_annos_withlabels.mat",
        download=download,
        downloadable=False,
    )
    check_classes(data.classes, classnames.CARS, "Stanford Cars", where, by_name=False)
    return ImageView(data)


def _food101_part(data: Any, part: str, where: Path) -> Dataset:
    """Food-101's official 750 train / 250 test images per class, its classes checked."""
    check_classes(data.classes, classnames.FOOD101_FOLDERS, "Food-101", where)
    return ImageView(data)


load_food101 = torchvision_loader(TorchvisionLayout(
    "Food101", "Food-101", "food-101", "images/<class>/<id>.jpg for its 101 class folders, meta/train.json and "
    "meta/test.json", "split", select=_food101_part))
