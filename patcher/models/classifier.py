"""A CLIP image encoder with one frozen zero-shot head per task: one encoder pass serves every head.

Given `encoder_state` (on the encoder's device), the classifier evaluates the encoder at those weights
(`torch.func.functional_call`) without loading them into the module: a state is scored explicitly, whatever
weights the shared model holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class MultiHeadClassifier(nn.Module):
    """normalize(encoder(image)) @ head_t for every task t; heads are buffers, never trained."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, torch.Tensor],
                 encoder_state: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_names = list(heads)
        self.encoder_state = None if encoder_state is None else dict(encoder_state)
        for index, task in enumerate(self.task_names):
            self.register_buffer(f"head_{index}", heads[task].detach().clone().float())

    def head(self, task: str) -> torch.Tensor:
        """The [D, C] head of one task (class embeddings times logit scale)."""
        return getattr(self, f"head_{self.task_names.index(task)}")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [N, D]."""
        if self.encoder_state is None:
            return F.normalize(self.encoder(images), dim=-1)
        return F.normalize(functional_call(self.encoder, self.encoder_state, (images,)), dim=-1)

    def forward(self, images: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
        """Logits per task ({task: [N, C]}); only `task`'s when given."""
        features = self.embed(images)
        tasks = [task] if task is not None else self.task_names
        return {name: features @ self.head(name).to(features.dtype) for name in tasks}
