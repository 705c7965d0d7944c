"""Losses the methods share: cross-entropy over a mixed batch, each item scored by its own task's head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from patcher.models.classifier import MultiHeadClassifier
from patcher.training.sampling import MixedBatch, TaskMixture


def mixture_cross_entropy(
    features: torch.Tensor,
    batch: MixedBatch,
    head: Callable[[str], torch.Tensor],
) -> torch.Tensor:
    """Cross-entropy of a mixed batch's items, each under its task's head: the global batch mean once DDP averages."""
    labels = batch.labels.to(features.device, non_blocking=True)
    total = features.new_zeros((), dtype=torch.float32)
    for task, where in batch.slices.items():
        logits = features[where] @ head(task).to(features.dtype)
        total = total + F.cross_entropy(logits.float(), labels[where], reduction="sum")
    return total * batch.loss_scale


def classification_loss(
    classifier: MultiHeadClassifier, mixture: TaskMixture, device: str = "cpu"
) -> Callable[[int], torch.Tensor]:
    """step -> cross-entropy of the mixture's batch at that step, one encoder pass for every task."""

    def step_loss(step: int) -> torch.Tensor:
        batch = mixture.batch(step)
        return mixture_cross_entropy(classifier.embed(batch.inputs(device)), batch, classifier.head)

    return step_loss
