"""Top-1 accuracy of a multi-head classifier on image stores, streamed in batches and sharded over ranks.

A classifier here is any module called as `classifier(images, task=task)` returning {task: logits}
(`patcher.models.classifier.MultiHeadClassifier`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from patcher.base import distributed
from patcher.data.image_store import ImageStore
from patcher.data.transforms import Normalize


def shard(count: int) -> np.ndarray:
    """This rank's contiguous share of range(count)."""
    return np.array_split(np.arange(count), distributed.world_size())[distributed.rank()]


def pixel_batches(store: ImageStore, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) of consecutive batches of `indices`, the next batch read while this one is used."""
    starts = range(0, len(indices), batch_size)
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = None
        for start in starts:
            rows = indices[start : start + batch_size]
            current = pending.result() if pending is not None else store.read(rows)
            following = start + batch_size
            if following < len(indices):
                pending = reader.submit(store.read, indices[following : following + batch_size])
            else:
                pending = None
            yield current, store.labels[rows]


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()


@torch.no_grad()
def predict(classifier: nn.Module, store: ImageStore, task: str, normalize: Normalize,
            indices: np.ndarray | None = None, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Predicted class of one task's head for the store's items at `indices` (all of them by default)."""
    classifier.eval().to(device)
    indices = np.arange(len(store)) if indices is None else indices
    predictions = []
    with _autocast(device):
        for pixels, _ in pixel_batches(store, indices, batch_size):
            images = normalize(torch.from_numpy(pixels).to(device, non_blocking=True))
            predictions.append(classifier(images, task=task)[task].argmax(dim=-1).cpu())
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def correct_counts(classifier: nn.Module, store: ImageStore, task: str, normalize: Normalize,
                   batch_size: int = 256, device: str = "cpu") -> tuple[int, int]:
    """(correct, total) of one task's head on this rank's shard of a store."""
    mine = shard(len(store))
    predicted = predict(classifier, store, task, normalize, mine, batch_size, device)
    return int((predicted == torch.from_numpy(store.labels[mine])).sum()), len(mine)


def accuracies(classifier: nn.Module, stores: Mapping[str, ImageStore], normalize: Normalize,
               batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    """Accuracy in percent per task, each on its own store, summed over every rank's shard."""
    counts = [correct_counts(classifier, store, task, normalize, batch_size, device) for task, store in stores.items()]
    totals = distributed.all_reduce_sum(torch.tensor(counts, dtype=torch.int64).reshape(-1, 2))
    return {task: 100.0 * int(correct) / int(total) if int(total) else float("nan")
            for task, (correct, total) in zip(stores, totals.tolist(), strict=True)}
