"""ImageNet's distribution shifts as WiSE-FT and FLYP evaluate them, each read from its published on-disk layout.

    imagenet-v2      imagenetv2-matched-frequency-format-val/<class index 0..999>/*.jpeg   (10,000 images)
    imagenet-r       imagenet-r/<wnid>/*.jpg, 200 wnid folders                              (30,000)
    imagenet-a       imagenet-a/<wnid>/*.jpg, 200 wnid folders                              (7,500)
    imagenet-sketch  sketch/<wnid>/*.JPEG, 1,000 wnid folders                               (50,889)
    objectnet        objectnet-1.0/images/<folder>/*.png, the 113 folders mapped to ImageNet (18,574)

ImageNet-R and -A are scored by restricting ImageNet's 1,000-class logits to their 200 classes (their head is
those columns of ImageNet's); ObjectNet's classes each take the best logit of the ImageNet classes mapped to them,
and its images lose the 2-pixel border, as in WiSE-FT's code. The wnid lists and subsets are timm's (a dependency
of open_clip), which equal WiSE-FT's. These are evaluation sets: no train part, their held-out split a seeded 10%
of their images (at most 5,000), the rest their test split.
"""

from __future__ import annotations

import os
import pkgutil
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.data.tasks.loaders import torchvision_class
from patcher.data.tasks.missing import missing_data_error, open_dataset
from patcher.data.tasks.objectnet_classes import OBJECTNET
from patcher.data.tasks.views import ImageView

V2_FOLDER = "imagenetv2-matched-frequency-format-val"
V2_URL = "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz"
URLS = {"imagenet-r": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
        "imagenet-a": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar"}
OBJECTNET_IMAGES = Path("objectnet-1.0") / "images"
BORDER = 2  # pixels ObjectNet's images lose on each side (their 1-pixel red frame and its blur)


def _timm_lines(name: str) -> list[str]:
    from patcher.base.compat import import_torchvision

    import_torchvision()  # timm imports torchvision
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    if data is None:
        raise PatcherError(f"timm's {name} is missing: reinstall timm (open_clip's dependency)")
    return data.decode().split()


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's 1,000 wnids in label order (sorted)."""
    return tuple(_timm_lines("imagenet_synsets.txt"))


@cache
def subset_columns(subset: str) -> tuple[int, ...]:
    """The ImageNet label indices of ImageNet-R's or -A's 200 classes ("r" or "a"), ascending."""
    return tuple(int(index) for index in _timm_lines(f"imagenet_{subset}_indices.txt"))


def download(url: str, root: Path) -> None:
    """Fetch and unpack an archive into root (torchvision's downloader)."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, download_root=str(root))


def _image_folder(where: Path, title: str, expected: str, fetch: Callable[[], None] | None,
                  download_wanted: bool) -> Any:
    folder = torchvision_class("ImageFolder")

    def make() -> Any:
        if download_wanted and fetch is not None and not where.is_dir():
            fetch()
        return folder(str(where))

    return open_dataset(make, title=title, where=where, expected=expected, download=download_wanted,
                        downloadable=fetch is not None)


def _check_wnids(found: list[str], expected: tuple[str, ...], title: str, where: Path) -> None:
    if list(found) != list(expected):
        missing = sorted(set(expected) - set(found))[:3]
        raise PatcherError(f"{title} under {where} has {len(found)} class folders; expected the {len(expected)} wnid "
                           f"folders of the published set ({', '.join(expected[:3])}, ...)"
                           + (f"; missing {', '.join(missing)}" if missing else ""))


def load_imagenet_v2(part: str, root: Path, download_wanted: bool) -> Dataset:
    """ImageNetV2 matched-frequency from root/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg."""
    where = root / V2_FOLDER
    data = _image_folder(where, "ImageNet-V2", "<class index 0..999>/*.jpeg (imagenetv2-matched-frequency.tar.gz "
                         "unpacked)", partial(download, V2_URL, root), download_wanted)
    if sorted(data.classes, key=int) != [str(index) for index in range(1000)]:
        raise PatcherError(f"ImageNet-V2 under {where} has {len(data.classes)} class folders; expected 1000 "
                           "named by class index 0 ... 999")
    return ImageView(data, target=lambda label: int(data.classes[label]))  # folders sort as text: "10" < "2"


def _load_subset(subset: str, part: str, root: Path, download_wanted: bool) -> Dataset:
    name = f"imagenet-{subset}"
    where = root / name
    data = _image_folder(where, f"ImageNet-{subset.upper()}", "<wnid>/*.jpg for its 200 wnid folders "
                         f"({name}.tar unpacked)", partial(download, URLS[name], root), download_wanted)
    wnids = imagenet_wnids()
    _check_wnids(data.classes, tuple(wnids[index] for index in subset_columns(subset)), f"ImageNet-{subset.upper()}",
                 where)
    return ImageView(data)


load_imagenet_r = partial(_load_subset, "r")
load_imagenet_a = partial(_load_subset, "a")


def load_imagenet_sketch(part: str, root: Path, download_wanted: bool) -> Dataset:
    """ImageNet-Sketch from root/sketch/<wnid>/*.JPEG (ImageNet-Sketch.zip unpacked)."""
    where = root / "sketch"
    data = _image_folder(where, "ImageNet-Sketch", "<wnid>/*.JPEG for 1000 wnid folders (ImageNet-Sketch.zip from "
                         "github.com/HaohanWang/ImageNet-Sketch, unpacked)", None, download_wanted)
    _check_wnids(data.classes, imagenet_wnids(), "ImageNet-Sketch", where)
    return ImageView(data)


class ObjectNetImages(Dataset):
    """ObjectNet's images of the given class folders, labelled by folder order, BORDER pixels cut from every side."""

    def __init__(self, where: Path, folders: list[str]) -> None:
        self.files: list[tuple[str, int]] = []
        for label, folder in enumerate(folders):
            names = sorted(entry.name for entry in os.scandir(where / folder) if entry.is_file())
            self.files += [(str(where / folder / name), label) for name in names]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.files[index]
        with Image.open(path) as image:
            width, height = image.size
            return image.convert("RGB").crop((BORDER, BORDER, width - BORDER, height - BORDER)), label


def load_objectnet(part: str, root: Path, download_wanted: bool) -> Dataset:
    """ObjectNet's 113 classes that map to ImageNet, from root/objectnet-1.0/images/<folder>/*.png."""
    where = root / OBJECTNET_IMAGES
    folders = [folder for folder, _, _ in OBJECTNET]
    expected = ("images/<folder>/*.png with the 113 folders mapped to ImageNet (objectnet-1.0.zip from objectnet.dev, "
                "unpacked; it needs its licence accepted)")
    missing = [folder for folder in folders if not (where / folder).is_dir()]
    if len(missing) == len(folders):
        raise missing_data_error("ObjectNet", root / "objectnet-1.0", expected, downloadable=False)
    if missing:
        raise PatcherError(f"ObjectNet under {where} lacks {len(missing)} of the 113 class folders mapped to ImageNet "
                           f"({', '.join(missing[:3])}, ...): unpack the whole objectnet-1.0 archive")
    return ImageView(ObjectNetImages(where, folders))
