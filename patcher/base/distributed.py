"""Data-parallel processes under torchrun: who this process is, and the few collectives patcher needs.

One process is the default. Under `torchrun --nproc-per-node N -m patcher build ...` (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), `init_from_environment` joins the process group:
nccl on CUDA, gloo on CPU. Every helper here is a no-op, or the identity, on one process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from patcher.base.errors import PatcherError

TIMEOUT = timedelta(minutes=30)  # a collective that waits longer than this means a rank died or hangs


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str) -> str:
    """Join the process group torchrun describes (if any) and return this rank's device ("cuda:<local rank>")."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise PatcherError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                               "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 on one process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 on one process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints progress (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where collectives' tensors must live: the GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `values` over ranks (a new tensor; float64 or int64 sums are exact)."""
    if world_size() == 1:
        return values.clone()
    total = values.to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(values.device)


def broadcast(value: Any) -> Any:
    """Rank 0's `value`, on every rank (a picklable object made by this program, never read from outside)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's `rows` in rank order; `counts[r]` is rank r's number of rows."""
    if world_size() == 1:
        return rows
    width = max(counts)
    padded = rows.new_zeros((width, *rows.shape[1:]), device=_collective_device())
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)]).to(rows.device)
