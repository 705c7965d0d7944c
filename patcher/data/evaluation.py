"""Top-1 accuracy of a multi-head classifier on preprocessed splits."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
from torch.utils.data import TensorDataset

from patcher.models.classifier import MultiHeadClassifier


@torch.no_grad()
def predict(
    classifier: MultiHeadClassifier, images: torch.Tensor, task: str, batch_size: int = 256, device: str = "cpu"
) -> torch.Tensor:
    """Predicted class indices of one task's head for a tensor of preprocessed images."""
    classifier.eval().to(device)
    predictions = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    with autocast:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            predictions.append(classifier(batch, task=task)[task].argmax(dim=-1).cpu())
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def accuracy(
    classifier: MultiHeadClassifier, data: TensorDataset, task: str, batch_size: int = 256, device: str = "cpu"
) -> float:
    """Top-1 accuracy in percent of one task's head on one split."""
    images, labels = data.tensors
    if len(labels) == 0:
        return float("nan")
    predicted = predict(classifier, images, task, batch_size, device)
    return 100.0 * (predicted == labels).float().mean().item()


def accuracies(
    classifier: MultiHeadClassifier, splits: Mapping[str, TensorDataset], batch_size: int = 256, device: str = "cpu"
) -> dict[str, float]:
    """Accuracy in percent per task, each on its own split."""
    return {task: accuracy(classifier, data, task, batch_size, device) for task, data in splits.items()}

