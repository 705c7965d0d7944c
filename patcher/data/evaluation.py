"""Top-1 accuracy and confusion matrices of a multi-head classifier on image stores, streamed in batches and
sharded over ranks.

A classifier here is any module called as `classifier(images, task=task)` returning {task: logits}
(`patcher.models.classifier.MultiHeadClassifier`). A task whose head has several columns per label (ObjectNet's
classes, each scored as the best of its ImageNet classes) passes `column_labels`: the label each column stands for,
so the label predicted is that of the best column, which is the label whose best column is highest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from patcher.base import distributed
from patcher.data.image_store import ImageStore
from patcher.data.metrics import Scores, confusion_matrix
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


@dataclass(frozen=True, kw_only=True)
class Scorer:
    """How a classifier is run on image stores: the module, the normalisation its inputs need, images per batch and
    the device."""

    classifier: nn.Module
    normalize: Normalize
    batch_size: int = 256
    device: str = "cpu"


@torch.no_grad()
def predict(scorer: Scorer, store: ImageStore, task: str, indices: np.ndarray | None = None) -> torch.Tensor:
    """Predicted class of one task's head for the store's items at `indices` (all of them by default)."""
    classifier, device = scorer.classifier, scorer.device
    classifier.eval().to(device)
    indices = np.arange(len(store)) if indices is None else indices
    predictions = []
    with _autocast(device):
        for pixels, _ in pixel_batches(store, indices, scorer.batch_size):
            images = scorer.normalize(torch.from_numpy(pixels).to(device, non_blocking=True))
            predictions.append(classifier(images, task=task)[task].argmax(dim=-1).cpu())
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def correct_counts(scorer: Scorer, store: ImageStore, task: str) -> tuple[int, int]:
    """(correct, total) of one task's head on this rank's shard of a store."""
    mine = shard(len(store))
    predicted = predict(scorer, store, task, mine)
    return int((predicted == torch.from_numpy(store.labels[mine])).sum()), len(mine)


def accuracies(scorer: Scorer, stores: Mapping[str, ImageStore]) -> dict[str, float]:
    """Accuracy in percent per task, each on its own store, summed over every rank's shard."""
    counts = [correct_counts(scorer, store, task) for task, store in stores.items()]
    totals = distributed.all_reduce_sum(torch.tensor(counts, dtype=torch.int64).reshape(-1, 2))
    return {task: 100.0 * int(correct) / int(total) if int(total) else float("nan")
            for task, (correct, total) in zip(stores, totals.tolist(), strict=True)}


@dataclass(frozen=True)
class Labelling:
    """How one task's predictions are counted: its number of labels, and the label of each head column (None when
    column i is label i)."""

    classes: int
    column_labels: tuple[int, ...] | None = None


def confusion_counts(scorer: Scorer, store: ImageStore, task: str, labelling: Labelling) -> np.ndarray:
    """[C, C] counts of true label by predicted label on this rank's shard of a store."""
    mine = shard(len(store))
    predicted = predict(scorer, store, task, mine).numpy()
    if labelling.column_labels is not None:
        predicted = np.asarray(labelling.column_labels, dtype=np.int64)[predicted]
    return confusion_matrix(store.labels[mine], predicted, labelling.classes)


def scores(scorer: Scorer, stores: Mapping[str, ImageStore], labelling: Mapping[str, Labelling]) -> dict[str, Scores]:
    """Each task's scores on its own store, the confusion matrices summed over every rank's shard."""
    counts = [confusion_counts(scorer, store, task, labelling[task]) for task, store in stores.items()]
    flat = torch.from_numpy(np.concatenate([matrix.ravel() for matrix in counts]) if counts else np.zeros(0, np.int64))
    summed = distributed.all_reduce_sum(flat).numpy()
    result, start = {}, 0
    for task, matrix in zip(stores, counts, strict=True):
        result[task] = Scores(summed[start : start + matrix.size].reshape(matrix.shape).astype(np.int64))
        start += matrix.size
    return result
