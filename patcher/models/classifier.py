"""A CLIP image encoder with one frozen zero-shot head per task: one encoder pass serves every head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadClassifier(nn.Module):
    """normalize(encoder(image)) @ head_t for every task t; heads are buffers, never trained."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_names = list(heads)
        for index, task in enumerate(self.task_names):
            self.register_buffer(f"head_{index}", heads[task].detach().clone().float())

    def head(self, task: str) -> torch.Tensor:
        """The [D, C] head of one task (class embeddings times logit scale)."""
        return getattr(self, f"head_{self.task_names.index(task)}")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [N, D]."""
        return F.normalize(self.encoder(images), dim=-1)

    def forward(self, images: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
        """Logits per task ({task: [N, C]}); only `task`'s when given."""
        features = self.embed(images)
        tasks = [task] if task is not None else self.task_names
        return {name: features @ self.head(name).to(features.dtype) for name in tasks}
