"""Embeddings of a whole split with a frozen encoder: what a linear probe and CAR-FT's reference are computed on."""

from __future__ import annotations

import torch

from patcher.models.classifier import MultiHeadClassifier


@torch.no_grad()
def embed_all(classifier: MultiHeadClassifier, images: torch.Tensor, device: str = "cpu",
              batch_size: int = 256) -> torch.Tensor:
    """L2-normalised embeddings [N, D] (on CPU) of preprocessed images, in eval mode."""
    was_training = classifier.training
    classifier.eval()
    chunks = [classifier.embed(images[start : start + batch_size].to(device)).float().cpu()
              for start in range(0, len(images), batch_size)]
    classifier.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)
