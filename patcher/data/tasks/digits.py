"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): a real dataset that is always offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from patcher.data.tasks.splits import partition_indices
from patcher.data.tasks.views import ArrayImages, ImageView

PARTS = ("pretrain", "train", "test")  # seeded stratified thirds; "pretrain" is for the reference model


def load_digits(part: str, root: Path, download: bool) -> Dataset:
    """One third of the digits as 8x8 RGB images (values 0..16 scaled to 0..255); root is not used."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    parts = dict(zip(PARTS, partition_indices(bunch.target, weights=(1, 1, 1)), strict=True))
    return ImageView(ArrayImages(images, bunch.target), parts[part])
