"""Few-shot training splits (`--shots K`, FLYP's few-shot setting): K training images per class, seeded.

The choice is a function of (labels, K, seed) alone, through numpy's PCG64 generator (as the held-out split),
so every process of a torchrun build, and every later rerun, trains on the same images. Labels are read
without decoding images wherever the dataset keeps them (torchvision's `targets` / `labels`, patcher's views
and arrays); any other dataset is read item by item once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from patcher.base.errors import PatcherError
from patcher.data.tasks.views import ArrayImages, ImageView

LABEL_ATTRIBUTES = ("targets", "labels", "_labels")  # where torchvision's datasets keep their labels


def _raw_labels(dataset: Dataset) -> list[Any] | None:
    """The labels (or raw targets) of every item, read without decoding images; None when the dataset hides them."""
    if isinstance(dataset, ArrayImages):
        return list(dataset.labels)
    if isinstance(dataset, ImageView):
        base = _raw_labels(dataset.base)
        if base is None:
            return None
        picked = base if dataset.indices is None else [base[int(index)] for index in dataset.indices]
        return picked if dataset.target is None else [dataset.target(label) for label in picked]
    if isinstance(dataset, Subset):
        base = _raw_labels(dataset.dataset)
        return None if base is None else [base[int(index)] for index in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [_raw_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else [label for part in parts for label in part]
    if hasattr(dataset, "_samples"):  # torchvision's GTSRB: (path, label) pairs
        return [label for _, label in dataset._samples]
    for attribute in LABEL_ATTRIBUTES:
        labels = getattr(dataset, attribute, None)
        if labels is not None and len(labels) == len(dataset):  # type: ignore[arg-type]
            return [int(label) for label in labels]
    return None


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The int label of every item of a dataset of (image, label) items."""
    labels = _raw_labels(dataset)
    if labels is None:
        labels = [dataset[index][1] for index in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray([int(label) for label in labels], dtype=np.int64)


def few_shot_indices(labels: Sequence[int] | np.ndarray, shots: int, seed: int = 0,
                     num_classes: int | None = None) -> np.ndarray:
    """Sorted indices of `shots` items of every class (0 .. num_classes - 1, or every label present): the first
    items of each class in a seeded permutation. ValueError naming the class when one has fewer than `shots`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen = []
    for label in np.unique(labels) if num_classes is None else np.arange(num_classes):
        members = order[labels[order] == label]
        if len(members) < shots:
            raise ValueError(f"class {int(label)} has {len(members)} training images, fewer than {shots}")
        chosen.append(members[:shots])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class FewShot:
    """K training images per class, chosen with this seed."""

    shots: int
    seed: int = 0

    def select(self, dataset: Dataset, task: str, num_classes: int) -> Dataset:
        """The few-shot part of a task's training split; PatcherError when a class has fewer than K images."""
        try:
            indices = few_shot_indices(dataset_labels(dataset), self.shots, self.seed, num_classes)
        except ValueError as error:
            raise PatcherError(f"--shots {self.shots} on {task}: {error}: lower --shots") from None
        return ImageView(dataset, indices)
