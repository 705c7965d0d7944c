"""Which items each training step sees: seeded per-epoch permutations, balanced over tasks, split over ranks.

The batch at a step is a pure function of (seed, step): the global batch's indices come from the epoch's
permutation, each item's augmentation seed from (seed, task, step, position). Under torchrun each rank
takes every world-size-th position of that same global batch, so N processes see exactly the items
(and augmentations) one process would, and `--resume` from any checkpoint replays the same stream.
With gradient accumulation a rank's part of the batch is cut into micro-batches (`Micro`), each task's rows
in equal runs, so the micro-batches together hold exactly the items of the undivided batch.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from patcher.base import distributed
from patcher.base.errors import PatcherError
from patcher.data.items import Batch, ItemError, unbatched
from patcher.data.prepared_splits import TrainSplit

SEED_STRIDE = 7919  # task i draws its batches with seed + SEED_STRIDE * i, so tasks shuffle independently
WORKER_TIMEOUT_S = 600


@functools.lru_cache(maxsize=4)
def _permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`: a stream of seeded per-epoch permutations, so any step can be replayed."""
    start = step * batch_size
    indices: list[int] = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_items)
        indices.extend(_permutation(num_items, seed, epoch)[offset : offset + batch_size - len(indices)].tolist())
    return torch.tensor(indices)


def item_seed(seed: int, step: int, position: int) -> int:
    """The augmentation seed of the item at `position` of the global batch at `step`."""
    digest = hashlib.blake2b(f"{seed}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def caption_templates(templates: int, count: int, seed: int, step: int, stream: int) -> torch.Tensor:
    """Which of a task's `templates` captions each of the `count` items of the step's batch (seeded by stream)."""
    generator = torch.Generator().manual_seed(seed * 104_729 + step * 31 + stream)
    return torch.randint(templates, (count,), generator=generator)


def split_batch(batch_size: int, parts: int) -> list[int]:
    """Equal shares of a batch (the first parts take the remainder); refuses shares of zero."""
    if batch_size < parts:
        raise PatcherError(f"batch size {batch_size} is smaller than the {parts} tasks it must mix: raise --batch-size")
    share, extra = divmod(batch_size, parts)
    return [share + (1 if index < extra else 0) for index in range(parts)]


class StepSampler:
    """A DataLoader batch sampler: from `start` on, this rank's (index, augmentation seed) keys of each step."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int) -> None:
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.positions = list(range(distributed.rank(), batch_size, distributed.world_size()))

    def keys(self, step: int) -> list[tuple[int, int]]:
        """This rank's keys of the global batch at `step`."""
        indices = batch_indices(self.size, self.batch_size, step, self.seed)
        return [(int(indices[p]), item_seed(self.seed, step, p)) for p in self.positions]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.keys(step)
            step += 1


@dataclass(frozen=True)
class Micro:
    """Which micro-batch of a step a forward pass takes: number `index` of `count` (gradient accumulation)."""

    index: int = 0
    count: int = 1

    @property
    def last(self) -> bool:
        """Whether this is the step's last micro-batch (the one whose backward pass synchronises ranks)."""
        return self.index == self.count - 1


WHOLE = Micro()  # the whole batch of a step, in one pass


def micro_rows(sizes: Sequence[int], micro: Micro) -> torch.Tensor:
    """Rows of micro-batch `micro` in a batch made of consecutive parts of `sizes` rows: an equal run of each part."""
    rows, start = [], 0
    for size in sizes:
        share, extra = divmod(size, micro.count)
        first = start + micro.index * share + min(micro.index, extra)
        rows.append(torch.arange(first, first + share + (1 if micro.index < extra else 0)))
        start += size
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)


@dataclass
class MixedBatch:
    """This rank's items of several tasks, task by task; `slices[task]` says where each task's items are."""

    parts: dict[str, Batch]
    global_size: int  # items of the whole step's batch, over every rank

    @property
    def slices(self) -> dict[str, slice]:
        """Rows of each task in `inputs` / `labels`."""
        slices, start = {}, 0
        for task, part in self.parts.items():
            slices[task] = slice(start, start + len(part.labels))
            start += len(part.labels)
        return slices

    @property
    def labels(self) -> torch.Tensor:
        """Labels of every item, task by task."""
        return torch.cat([part.labels for part in self.parts.values()])

    def inputs(self, device: str | torch.device) -> torch.Tensor:
        """The model's inputs of every item on `device`."""
        return torch.cat([part.images(device) for part in self.parts.values()])

    def rows(self, micro: Micro) -> torch.Tensor:
        """Rows of `inputs` / `labels` that micro-batch `micro` takes."""
        return micro_rows([len(part.labels) for part in self.parts.values()], micro)

    def micro(self, micro: Micro) -> MixedBatch:
        """Micro-batch `micro` of this batch: an equal run of each task's rows (the batch itself for `WHOLE`)."""
        if micro.count == 1:
            return self
        parts = {}
        for task, part in self.parts.items():
            rows = micro_rows([len(part.labels)], micro)
            parts[task] = Batch(part.inputs[rows], part.labels[rows], part.normalize)
        return MixedBatch(parts, self.global_size)

    @property
    def loss_scale(self) -> float:
        """Multiply a sum of per-item losses by this: the global mean once DDP averages gradients over ranks."""
        return distributed.world_size() / self.global_size


def _next(iterator: Iterator[Any], task: str) -> Batch:
    try:
        batch = next(iterator)
    except RuntimeError as error:
        if "DataLoader" not in str(error):
            raise
        raise PatcherError(f"a data loader worker for {task} failed ({str(error).splitlines()[0]}): rerun with "
                           "--workers 0 to read in this process and see the file") from None
    if isinstance(batch, ItemError):
        raise PatcherError(batch.message(f"{task}/train"))
    return batch


class TaskMixture:
    """Deterministic balanced sampling: batch(step) depends only on the step, as the training loop requires.

    Each task's items come through its own DataLoader; steps are read in order, and a jump (a resumed
    run) restarts the loaders at the new step.
    """

    def __init__(self, splits: Mapping[str, TrainSplit], batch_size: int, seed: int,
                 shares: Sequence[int] | None = None) -> None:
        if not splits:
            raise PatcherError("no training data: at least one patch task is needed")
        self.splits = dict(splits)
        self.shares = dict(zip(self.splits, shares or split_batch(batch_size, len(self.splits)), strict=True))
        if any(share < 1 for share in self.shares.values()):
            raise PatcherError(f"batch size {batch_size} is too small for {len(self.splits)} data sources")
        self.seed = seed
        self._iterators: dict[str, Iterator[Any]] = {}
        self._next_step: int | None = None
        self._last: tuple[int, MixedBatch] | None = None  # micro-batches of one step read its batch once

    @property
    def tasks(self) -> list[str]:
        """Task names in batch order."""
        return list(self.splits)

    def sampler(self, task: str, start: int = 0) -> StepSampler:
        """The batch sampler of one task's share, from step `start`."""
        number = self.tasks.index(task)
        return StepSampler(len(self.splits[task]), self.shares[task], self.seed + SEED_STRIDE * number, start)

    def _start(self, step: int) -> None:
        self.close()
        for task, split in self.splits.items():
            loader = DataLoader(split.items, batch_sampler=self.sampler(task, step), num_workers=split.workers,
                                collate_fn=unbatched, pin_memory=split.pin_memory,
                                timeout=WORKER_TIMEOUT_S if split.workers else 0)
            self._iterators[task] = iter(loader)
        self._next_step = step

    def batch(self, step: int) -> MixedBatch:
        """The batch at `step` (this rank's part of it): every task's share."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if step != self._next_step:
            self._start(step)
        parts = {task: _next(iterator, task) for task, iterator in self._iterators.items()}
        self._next_step = step + 1
        self._last = (step, MixedBatch(parts, sum(self.shares.values())))
        return self._last[1]

    def close(self) -> None:
        """Stop the loaders' workers."""
        self._iterators.clear()
        self._next_step = None
        self._last = None
