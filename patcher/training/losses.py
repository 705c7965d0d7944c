"""Losses the methods and pretraining share: cross-entropy over a mixed batch, each item under its own task's
head, and UniCL's class-level image-text contrastive loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from patcher.models.classifier import MultiHeadClassifier
from patcher.training.sampling import WHOLE, Micro, MixedBatch, TaskMixture

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at 100; pretraining and FLYP do too


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
    """(step, micro-batch) -> cross-entropy of that part of the mixture's batch, one encoder pass for every task;
    a per-item sum, so the micro-batches' losses add up to the batch's."""

    def step_loss(step: int, micro: Micro = WHOLE) -> torch.Tensor:
        batch = mixture.batch(step).micro(micro)
        return mixture_cross_entropy(classifier.embed(batch.inputs(device)), batch, classifier.head)

    return step_loss


def class_contrastive_loss(
    image_features: torch.Tensor, class_features: torch.Tensor, image_classes: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """UniCL's loss (Yang et al., 2022) with one caption per class: each image against the classes, its own the
    positive, and each class against the images, all of its images positives (its target spread over them)."""
    logits = logit_scale * image_features @ class_features.T  # [images, classes]
    image_to_text = F.cross_entropy(logits.float(), image_classes)
    members = F.one_hot(image_classes, len(class_features)).T.float()
    text_to_image = F.cross_entropy(logits.T.float(), members / members.sum(dim=1, keepdim=True))
    return (image_to_text + text_to_image) / 2
