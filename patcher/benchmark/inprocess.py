"""In-process baselines: the same graphs called directly from Python (onnxruntime, PyTorch eager), no server."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patcher.benchmark.loadgen import LoadResult
from patcher.export.providers import open_session

Runner = Callable[[], object]


def onnxruntime_runner(path: Path, batch: np.ndarray, threads: int = 0, device: str = "cpu",
                       tensorrt: dict[str, Any] | None = None) -> Runner:
    """A call running the ONNX file on `batch` (host memory in, host memory out) with onnxruntime on `device`
    (threads 0: its default; `tensorrt`: TensorRT's provider options, on a GPU)."""
    session = open_session(path, device, threads, tensorrt)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch)}
    return lambda: session.run(None, feed)


def torch_runner(graph: nn.Module, batch: np.ndarray, device: str = "cpu", bf16: bool = False) -> Runner:
    """A call running the PyTorch graph on `batch` in eager mode under inference_mode; on a GPU the batch goes from
    host memory and the outputs come back to it, as onnxruntime's do (`bf16`: under bf16 autocast)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch))
    cuda = device.startswith("cuda")
    if cuda:
        tensor = tensor.pin_memory()
    graph.eval().to(device)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and bf16 else nullcontext()

    def run() -> object:
        with torch.inference_mode(), precision:
            outputs = graph(tensor.to(device, non_blocking=True))
            return [output.cpu() for output in outputs] if cuda else outputs

    return run


def measure(run: Runner, duration_s: float, max_calls: int, warmup_calls: int = 1) -> LoadResult:
    """Call `run` back to back (concurrency 1) until `duration_s` passes or `max_calls` are made."""
    for _ in range(warmup_calls):
        run()
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + duration_s
    while len(latencies) < max_calls and time.perf_counter() < deadline:
        began = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - started
    return LoadResult(
        sent=len(latencies), succeeded=len(latencies), failed=0, elapsed_s=elapsed, latencies_s=np.array(latencies)
    )


def calibrate_threads(path: Path, batch: np.ndarray, candidates: list[int], seconds: float = 1.0,
                      rounds: int = 2) -> tuple[int, dict[str, float]]:
    """The onnxruntime intra-op thread count (of `candidates`) that runs `batch` fastest here now, and each's img/s.

    On a machine whose cores other work also uses, one thread can beat all of them: a parallel operator waits
    for its slowest thread, and a thread that lost its core waits for a scheduler time slice.
    """
    runners = {threads: onnxruntime_runner(path, batch, threads) for threads in candidates}
    pooled: dict[int, LoadResult] = {}
    for round_index in range(rounds):
        order = candidates if round_index % 2 == 0 else list(reversed(candidates))
        for threads in order:
            load = measure(runners[threads], seconds / rounds, 10**6, warmup_calls=2)
            pooled[threads] = pooled[threads].merge(load) if threads in pooled else load
    rates = {str(t): round(len(batch) * r.succeeded / r.elapsed_s, 2) for t, r in pooled.items() if r.elapsed_s}
    best = max(candidates, key=lambda t: rates.get(str(t), 0.0))
    return best, rates
