"""Turn a task's split into preprocessed image tensors once, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from patcher.progress import make_progress


class _Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


def preprocess_dataset(
    dataset: Dataset,
    transform: Callable[[Any], torch.Tensor],
    description: str,
    batch_size: int = 256,
    workers: int = 0,
) -> TensorDataset:
    """Apply the evaluation transform to every image once; (images [N,3,H,W] float32, labels [N] int64)."""
    loader = DataLoader(_Transformed(dataset, transform), batch_size=batch_size, num_workers=workers)
    images, labels = [], []
    with make_progress() as progress:
        bar = progress.add_task(description, total=len(dataset), status="")  # type: ignore[arg-type]
        for batch_images, batch_labels in loader:
            images.append(batch_images)
            labels.append(batch_labels)
            progress.advance(bar, len(batch_labels))
    if not images:
        return TensorDataset(torch.empty(0), torch.empty(0, dtype=torch.long))
    return TensorDataset(torch.cat(images), torch.cat(labels).long())
