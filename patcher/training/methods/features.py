"""Embeddings of a whole training split with a frozen encoder: what a linear probe trains on.

Streamed in batches through the split's un-augmented reader; under torchrun each rank embeds its shard
and every rank ends with all the rows, in item order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from patcher.base import distributed
from patcher.base.errors import PatcherError
from patcher.data.evaluation import shard
from patcher.data.items import ItemError, unbatched
from patcher.data.prepared_splits import TrainSplit
from patcher.models.classifier import MultiHeadClassifier


@torch.no_grad()
def embed_split(classifier: MultiHeadClassifier, split: TrainSplit, device: str = "cpu", batch_size: int = 256,
                what: str = "training images") -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised embeddings [N, D] on CPU, labels [N]) of every item of the split, in eval mode."""
    was_training = classifier.training
    classifier.eval()
    mine = shard(len(split))
    batches = [mine[start : start + batch_size].tolist() for start in range(0, len(mine), batch_size)]
    loader = DataLoader(split.plain, batch_sampler=batches, num_workers=split.workers, collate_fn=unbatched)
    features, labels = [], []
    for batch in loader:
        if isinstance(batch, ItemError):
            raise PatcherError(batch.message(what))
        features.append(classifier.embed(batch.images(device)).float())
        labels.append(batch.labels.to(device))
    classifier.train(was_training)
    local = torch.cat(features) if features else torch.empty(0, classifier.encoder.output_dim, device=device)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    counts = [len(part) for part in np.array_split(np.arange(len(split)), distributed.world_size())]
    return (distributed.all_gather_rows(local, counts).cpu(),
            distributed.all_gather_rows(local_labels, counts).cpu())
