"""Balanced batches over several tasks' training tensors: every batch holds each task in equal shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from patcher.errors import PatcherError
from patcher.training.loop import batch_indices

SEED_STRIDE = 7919  # task i draws its batches with seed + SEED_STRIDE * i, so tasks shuffle independently


def split_batch(batch_size: int, parts: int) -> list[int]:
    """Equal shares of a batch (the first parts take the remainder); refuses shares of zero."""
    if batch_size < parts:
        raise PatcherError(f"batch size {batch_size} is smaller than the {parts} tasks it must mix: raise --batch-size")
    share, extra = divmod(batch_size, parts)
    return [share + (1 if index < extra else 0) for index in range(parts)]


@dataclass
class MixedBatch:
    """Items of several tasks, concatenated task by task; `slices[task]` says where each task's items are."""

    inputs: torch.Tensor
    labels: torch.Tensor
    slices: dict[str, slice]


class TaskMixture:
    """Deterministic balanced sampling: batch(step) depends only on the step, as the training loop requires."""

    def __init__(self, data: Mapping[str, TensorDataset], batch_size: int, seed: int) -> None:
        if not data:
            raise PatcherError("no training data: at least one patch task is needed")
        self.data = dict(data)
        self.shares = dict(zip(self.data, split_batch(batch_size, len(self.data)), strict=True))
        self.seed = seed

    @property
    def tasks(self) -> list[str]:
        """Task names in batch order."""
        return list(self.data)

    def indices(self, task: str, step: int) -> torch.Tensor:
        """Indices into `task`'s tensors of its share of the batch at `step`."""
        number = self.tasks.index(task)
        size = len(self.data[task].tensors[1])
        return batch_indices(size, self.shares[task], step, self.seed + SEED_STRIDE * number)

    def batch(self, step: int) -> MixedBatch:
        """The batch at `step`: inputs and labels of every task, with each task's slice."""
        inputs, labels, slices, start = [], [], {}, 0
        for task, dataset in self.data.items():
            index = self.indices(task, step)
            inputs.append(dataset.tensors[0][index])
            labels.append(dataset.tensors[1][index])
            slices[task] = slice(start, start + len(index))
            start += len(index)
        return MixedBatch(torch.cat(inputs), torch.cat(labels), slices)
