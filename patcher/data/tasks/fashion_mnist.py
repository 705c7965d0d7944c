"""Fashion-MNIST through torchvision, installed offline from Debian's dataset-fashion-mnist if present."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.base.files import atomic_file
from patcher.data.tasks.loaders import IDX_FILES, torchvision_class
from patcher.data.tasks.missing import open_dataset
from patcher.data.tasks.views import ImageView

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_fashion_mnist(
    part: str, root: Path, download: bool, dataset_class: str | type = "FashionMNIST", debian_dir: Path = DEBIAN_DIR
) -> Dataset:
    """Fashion-MNIST from root/FashionMNIST/raw, first filled from `debian_dir` when it lacks the files."""
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in FILES) and all(
        (debian_dir / f"{name}.gz").is_file() for name in FILES
    ):
        install_from(debian_dir, raw)
    cls = torchvision_class(dataset_class)
    data = open_dataset(
        lambda: cls(str(root), train=part == "train", download=download),
        title="Fashion-MNIST",
        where=raw,
        expected=f"{IDX_FILES} (or their .gz under {debian_dir}, from Debian's dataset-fashion-mnist)",
        download=download,
    )
    return ImageView(data)


def install_from(source: Path, raw: Path) -> None:
    """Decompress the four IDX .gz files from `source` into `raw`, each written whole or not at all."""
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            with atomic_file(raw / name) as partial, gzip.open(source / f"{name}.gz", "rb") as packed, \
                    open(partial, "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked, length=1 << 20)
    except OSError as error:
        raise PatcherError(f"cannot install Fashion-MNIST from {source} into {raw}: {error}") from error
