"""Work per image (FLOPs of a graph, counted by PyTorch) and the machine's float32 matrix-multiply peak."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from patcher.export.trace import mha_fastpath_disabled

PEAK_SIZE = 2048


@torch.no_grad()
def flops_per_image(graph: nn.Module, image_size: tuple[int, int], batch: int = 4) -> int:
    """FLOPs one image costs in `graph` (matmuls, convolutions, attention; 2 per multiply-add), counted at `batch`."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(batch, 3, *image_size)
    counter = FlopCounterMode(display=False)
    with mha_fastpath_disabled(), counter:  # the fused MHA kernel is invisible to the counter (and not exported)
        graph(image)
    return int(counter.get_total_flops() // batch)


def matmul_peak(threads: int, size: int = PEAK_SIZE, seconds: float = 2.0) -> dict[str, Any]:
    """Best and median GFLOP/s of a float32 [size x size] @ [size x size] torch.matmul on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        torch.matmul(a, b)  # warm-up: thread pool, page faults
        timings: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(timings) < 3 or (time.perf_counter() < deadline and len(timings) < 50):
            began = time.perf_counter()
            torch.matmul(a, b)
            timings.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(previous)
    flops = 2.0 * size**3
    timings.sort()
    return {
        "size": size,
        "threads": threads,
        "repeats": len(timings),
        "peak_gflops": round(flops / timings[0] / 1e9, 2),
        "median_gflops": round(flops / timings[len(timings) // 2] / 1e9, 2),
    }


def achieved_gflops(images_per_s: float | None, flops: int | None) -> float | None:
    """GFLOP/s a throughput represents."""
    if images_per_s is None or not flops:
        return None
    return round(images_per_s * flops / 1e9, 3)
