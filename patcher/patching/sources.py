"""Where a merge reads its task vectors: one tensor of one run at a time, from memory or lazily from safetensors.

A merge of N runs never holds N models: it asks a `TaskVectors` for `vector(run, key)`, the fine-tuned tensor
minus the base tensor of one key of one run, and lets it go. `StateVectors` serves states already in memory (the
parallel strategy of `patcher build`); `FileVectors` opens each run's files with safetensors' `safe_open` for
every read (so no file stays mapped), reading only the tensor asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from patcher.base.errors import PatcherError
from patcher.models.state import State


class TaskVectors:
    """N task vectors over the floating-point keys of a base state, read one tensor at a time."""

    def __init__(self, base: Mapping[str, torch.Tensor], count: int) -> None:
        self.base = base
        self.count = count
        self.keys = [key for key, value in base.items() if value.is_floating_point()]

    def finetuned(self, run: int, key: str) -> torch.Tensor | None:
        """Run `run`'s fine-tuned value of `key`, None where the run did not train it."""
        raise NotImplementedError

    def vector(self, run: int, key: str) -> torch.Tensor:
        """theta_run[key] - theta_base[key] in float32 (zeros where the run did not train the key)."""
        value = self.finetuned(run, key)
        base = self.base[key].detach().float()
        if value is None:
            return torch.zeros_like(base)
        if value.shape != base.shape:
            raise PatcherError(f"{key} has shape {tuple(value.shape)} in run {run + 1} and {tuple(base.shape)} in "
                               "the base model: the runs come from different architectures")
        return value.detach().float() - base

    def stacked(self, key: str) -> torch.Tensor:
        """[N, *shape]: every run's task vector of one key (one tensor of each run)."""
        return torch.stack([self.vector(run, key) for run in range(self.count)])

    def flat(self, run: int) -> Iterator[torch.Tensor]:
        """One run's task vector, key by key, flattened (in `keys` order)."""
        for key in self.keys:
            yield self.vector(run, key).reshape(-1)

    @property
    def numel(self) -> int:
        """Elements of one flattened task vector."""
        return sum(self.base[key].numel() for key in self.keys)


class StateVectors(TaskVectors):
    """Task vectors of fine-tuned states held in memory."""

    def __init__(self, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> None:
        super().__init__(base, len(finetuned))
        self.states = list(finetuned)

    def finetuned(self, run: int, key: str) -> torch.Tensor | None:
        """The state's tensor."""
        return self.states[run].get(key)


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file whose tensors a state names with `prefix` + their name in the file."""

    path: Path
    prefix: str = ""
    only: frozenset[str] | None = None  # the state keys this file contributes (all when None)

    def names(self) -> list[str]:
        """The state keys the file holds (read from its header only)."""
        with safe_open(str(self.path), framework="pt") as handle:
            stored = handle.keys()  # safe_open is not iterable
        keys = [self.prefix + name for name in stored]
        return [key for key in keys if self.only is None or key in self.only]


class FileVectors(TaskVectors):
    """Task vectors of runs on disk: each read opens the file, reads one tensor and closes it."""

    def __init__(self, base: Mapping[str, torch.Tensor], runs: Sequence[Sequence[TensorFile]]) -> None:
        super().__init__(base, len(runs))
        self.index: list[dict[str, TensorFile]] = [
            {key: file for file in files for key in file.names()} for files in runs
        ]

    def finetuned(self, run: int, key: str) -> torch.Tensor | None:
        """The tensor, read lazily from the run's file that holds it."""
        file = self.index[run].get(key)
        if file is None:
            return None
        with safe_open(str(file.path), framework="pt") as handle:
            return handle.get_tensor(key[len(file.prefix):])


def materialise(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], coefficient: float) -> State:
    """base + coefficient * delta over the keys of delta, each in the base tensor's dtype; others copied."""
    state = {}
    for key, value in base.items():
        if key in delta:
            state[key] = (value.detach().float() + coefficient * delta[key]).to(value.dtype)
        else:
            state[key] = value.detach().clone()
    return state
