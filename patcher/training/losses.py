"""End-to-end fine-tuning of the image encoder through frozen heads (PAINT's `ft`), on one task or a mixture."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from patcher.models.classifier import MultiHeadClassifier
from patcher.training.loop import TrainConfig, train
from patcher.training.sampling import TaskMixture


def mixture_cross_entropy(
    features: torch.Tensor,
    labels: torch.Tensor,
    slices: Mapping[str, slice],
    head: Callable[[str], torch.Tensor],
) -> torch.Tensor:
    """Mean cross-entropy over a mixed batch, each item scored by its own task's head."""
    total = features.new_zeros((), dtype=torch.float32)
    for task, where in slices.items():
        logits = features[where] @ head(task).to(features.dtype)
        total = total + F.cross_entropy(logits.float(), labels[where], reduction="sum")
    return total / len(labels)


def classification_loss(
    classifier: MultiHeadClassifier, mixture: TaskMixture, device: str = "cpu"
) -> Callable[[int], torch.Tensor]:
    """step -> cross-entropy of the mixture's batch at that step, one encoder pass for every task."""

    def step_loss(step: int) -> torch.Tensor:
        batch = mixture.batch(step)
        features = classifier.embed(batch.inputs.to(device))
        return mixture_cross_entropy(features, batch.labels.to(device), batch.slices, classifier.head)

    return step_loss


def finetune(
    classifier: MultiHeadClassifier,
    train_data: TensorDataset | Mapping[str, TensorDataset],
    task: str | None,
    config: TrainConfig,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train `classifier.encoder` with cross-entropy through frozen heads; return the encoder's state.

    `train_data` is one task's split (named by `task`) or {task: split} for a balanced mixture.
    """
    torch.manual_seed(config.seed)
    data = dict(train_data) if isinstance(train_data, Mapping) else {str(task): train_data}
    classifier.to(device)
    encoder = classifier.encoder
    step_loss = classification_loss(classifier, TaskMixture(data, config.batch_size, config.seed), device)
    train(encoder, encoder.parameters(), step_loss, config, device, checkpoint_dir, log,
          f"fine-tuning on {', '.join(data)}")
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
