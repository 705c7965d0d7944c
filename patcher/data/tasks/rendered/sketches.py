"""Fashion sketches: real Fashion-MNIST images drawn as dark outlines on white (a miniature ImageNet-Sketch).

The reference model learnt the ten clothing names from Fashion-MNIST's photographs (light on black); their
outlines, inverted, are the same objects in another style. The train part sketches a seeded, class-balanced
subset of Fashion-MNIST's train images, the test part one of its test images.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from patcher.data.tasks.fashion_mnist import load_fashion_mnist
from patcher.data.tasks.views import ArrayImages, ImageView

PER_CLASS = {"train": 500, "test": 200}
_PART_SEEDS = {"train": 20, "test": 21}


def sketch(image: Image.Image) -> np.ndarray:
    """[28, 28] uint8: the image's edges, dark on white."""
    edges = np.asarray(image.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.int32)
    return (255 - np.clip(edges * 2, 0, 255)).astype(np.uint8)


@lru_cache(maxsize=2)
def _sketched(part: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    photos = load_fashion_mnist(part, root, False)
    labels = np.asarray(photos.base.targets)
    rng = np.random.default_rng(_PART_SEEDS[part])
    chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:PER_CLASS[part]]
                                     for c in range(10)]))
    images = np.stack([sketch(photos[int(index)][0]) for index in chosen])
    return images, labels[chosen].astype(np.int64)


def load_fashion_sketch(part: str, root: Path, download: bool) -> Dataset:
    """The train (500 per class) or test (200 per class) sketches, from Fashion-MNIST under `root`."""
    if download:
        load_fashion_mnist(part, root, True)
    images, labels = _sketched(part, root)
    return ImageView(ArrayImages(images, labels))
