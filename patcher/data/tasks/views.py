"""Dataset views that give every task the same items: (PIL image in RGB mode, int label)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class ImageView(Dataset):
    """Items of `base` as (RGB PIL image, int label), optionally restricted to `indices` and relabelled."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | np.ndarray | None = None,
        target: Callable[[Any], int] | None = None,
    ) -> None:
        self.base = base
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.target = target

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if self.indices is not None:
            index = int(self.indices[index])
        image, label = self.base[index]
        if self.target is not None:
            label = self.target(label)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image, int(label)


class ArrayImages(Dataset):
    """In-memory uint8 images [N, H, W] (grayscale) or [N, H, W, 3] with integer labels, as PIL items."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError("images must be uint8 and match labels in length")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])
