"""Measure a running server: sweep its models, add in-process baselines and accuracy, write one report.

The library half of `patcher bench`; `stages/bench.py` is the recipe that exports, writes a repository and
starts the server it measures.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tritonclient.utils import InferenceServerException

from patcher.base.errors import PatcherError
from patcher.base.files import now_iso
from patcher.base.progress import make_progress
from patcher.benchmark.accuracy import accuracy_of, accuracy_record
from patcher.benchmark.context import RunContext
from patcher.benchmark.flops import matmul_peak
from patcher.benchmark.inprocess import calibrate_threads
from patcher.benchmark.latency_plot import latency_throughput_plot
from patcher.benchmark.machine import load_average, machine_info
from patcher.benchmark.report import BenchReport, write_report
from patcher.benchmark.results import FORMAT, comparisons, targets
from patcher.benchmark.sweep import Sweep, SweepOptions, SweepServer, inprocess_runners, run_sweep
from patcher.benchmark.targets import BYTES_KIND, ServedTarget, check_batches, describe, inspect_target

CLIENT = "closed loop: a thread per concurrency slot, blocking gRPC unary calls on one channel, request serialised once"
DEFAULT_OUT = Path("bench/results")
THREADS_AUTO = "auto"


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What a benchmark sweeps and where its report goes: the sweep, out_dir and name (default: the run's, else the
    first model's), in-process baselines, the accuracy check's images, and whether failed requests end it."""

    sweep: SweepOptions = field(default_factory=SweepOptions)
    out_dir: Path = DEFAULT_OUT
    name: str | None = None
    include_inprocess: bool = True
    data_dir: Path | None = None
    accuracy_limit: int | None = 5000
    tolerate_failures: bool = False


@dataclass(frozen=True, kw_only=True)
class BenchServer:
    """The server a benchmark measures: its gRPC address, the models compared, the report's record of it, and
    what lets the benchmark see inside it (key headers, process group, its sessions' intra-op threads)."""

    url: str
    models: list[str]
    record: dict[str, Any] = field(default_factory=lambda: {"started_here": False})
    headers: dict[str, str] | None = None
    pgid: int | None = None
    threads: int | None = None  # None: read from the served configs


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_threads(context: RunContext, requested: int | str, batch: int) -> tuple[int, dict[str, Any]]:
    """The intra-op thread count for served and in-process sessions alike: as given, or calibrated ("auto")."""
    if requested != THREADS_AUTO:
        if not isinstance(requested, int) or requested < 0:
            raise PatcherError(f"intra_op_threads must be 'auto' or a count >= 0 (0: onnxruntime's default), "
                               f"got {requested!r}")
        return requested, {"mode": "given", "threads": requested}
    candidates = sorted({1, usable_cores()})
    array = np.random.default_rng(0).standard_normal((batch, 3, *context.image_size)).astype(np.float32)
    best, rates = calibrate_threads(context.onnx["patched"], array, candidates)
    return best, {"mode": "auto: fastest in-process onnxruntime run of the patched model", "threads": best,
                  "batch": batch, "images_per_s": rates}


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = [
        "Client, server and in-process baselines share this machine's cores: client CPU per request is recorded "
        "(client_cpu_ms_per_request in the JSON) and is CPU the server did not get.",
    ]
    failed = [r for r in rows if r["requests"]["failed"]]
    if failed:
        notes.append(f"{len(failed)} rows had failed requests; first errors: {failed[0]['errors']}")
    inconsistent = [r for r in rows if r.get("consistent") is False]
    if inconsistent:
        notes.append(f"{len(inconsistent)} rows: the server's counts differ from the client's (other traffic on the "
                     "server, or requests that never reached the model)")
    return notes


def check_failures(rows: list[dict[str, Any]], tolerate: bool) -> None:
    """PatcherError (one line) when requests failed, unless failures are tolerated: a ratio over failed requests
    measures the failures, not the models."""
    failed = sum(r["requests"]["failed"] for r in rows if r.get("runtime") == "triton")
    if not failed or tolerate:
        return
    sent = sum(r["requests"]["sent"] for r in rows if r.get("runtime") == "triton")
    first = next(r for r in rows if r.get("runtime") == "triton" and r["requests"]["failed"])
    error = next(iter(first["errors"]), "no message")
    raise PatcherError(f"{failed} of {sent} requests failed (first: {first['model']} batch {first['batch_size']} "
                       f"concurrency {first['concurrency']}: {error}): the results would measure the failures, so "
                       "none were written; check the server (`patcher serve` heals dead backends, see its log), or "
                       "pass --tolerate-failures to keep them")


def _served_threads(served: list[ServedTarget]) -> int:
    """The intra-op threads the server's classifier sessions use (its config parameter; 0 when unset)."""
    for target in served:
        value = target.config.get("parameters", {}).get("intra_op_threads", {}).get("string_value")
        if value not in (None, ""):
            return int(value)
    return 0


@dataclass(kw_only=True)
class _Swept:
    """What the sweep measured, and the settings it ran under."""

    rows: list[dict[str, Any]]
    served: list[ServedTarget]
    threads: int
    inprocess: bool
    flops: dict[str, int]
    peak: dict[str, Any]
    machine: dict[str, Any]


def _sweep(server: BenchServer, sweep: Sweep, context: RunContext | None, include_inprocess: bool) -> _Swept:
    """Every model and setting swept on the server (with the in-process runners when there is a run)."""
    from patcher.triton.client import connect

    client = connect(server.url)
    previous_threads = torch.get_num_threads()
    try:
        served = [inspect_target(client, server.url, model, server.headers) for model in server.models]
        check_batches(served, list(sweep.batch_sizes), server.url)
        threads = _served_threads(served) if server.threads is None else server.threads
        machine = machine_info()
        peak = matmul_peak(threads if threads > 0 else torch.get_num_threads())
        flops = dict(context.flops) if context else {}
        if "patched" in flops:
            flops[BYTES_KIND] = flops["patched"]
        local = inprocess_runners(context, threads) if context and include_inprocess else None
        slots = len(served) + (sum(2 if k in context.graphs else 1 for k in context.onnx) if local and context else 0)
        steps = len(sweep.batch_sizes) * len(sweep.concurrency) * sweep.rounds * slots
        if threads > 0:
            torch.set_num_threads(threads)
        with make_progress() as progress:
            bar = progress.add_task("benchmarking", total=steps, status="")

            def tick(status: str) -> None:
                progress.update(bar, advance=1, status=status)

            try:
                target = SweepServer(url=server.url, client=client, served=served, flops=flops,
                                     peak=peak["peak_gflops"], pgid=server.pgid, headers=server.headers)
                rows = run_sweep(target, sweep, local, tick)
            except InferenceServerException as error:  # requests' own failures are counted per row, not raised
                raise PatcherError(
                    f"the server at {server.url} stopped answering during the sweep ({error.message()}): "
                    "see its log; nothing was written") from None
    finally:
        client.close()
        torch.set_num_threads(previous_threads)
    return _Swept(rows=rows, served=served, threads=threads, inprocess=local is not None, flops=flops, peak=peak,
                  machine=machine)


def _settings(sweep: Sweep, swept: _Swept) -> dict[str, Any]:
    """The report's record of how it measured."""
    threads = swept.threads
    return {
        **asdict(sweep),
        "client": CLIENT,
        "order": "ABBA" if sweep.rounds > 1 else "single window",
        "warmup_requests": "max(4, 2 x concurrency) per model and setting, not counted",
        "intra_op_threads": threads,
        "in_process": f"concurrency 1, {threads or 'default'} intra-op threads (onnxruntime and torch)"
        if swept.inprocess
        else None,
    }


def measure(server: BenchServer, sweep: Sweep, context: RunContext | None, options: BenchOptions) -> BenchReport:
    """Sweep a running server's models (with `context`: also FLOPs, accuracy and in-process baselines); write
    `<name>`.json/.md/.png into out_dir and return the report. PatcherError if requests failed, unless tolerated."""
    if not server.models:
        raise PatcherError("no models to benchmark: pass model names, e.g. digits_patched,digits_zeroshot")
    swept = _sweep(server, sweep, context, options.include_inprocess)
    rows = swept.rows
    check_failures(rows, options.tolerate_failures)
    swept.machine["load_average_end"] = load_average()
    accuracy = None
    if context is not None:
        accuracy = accuracy_record(context.run, context.onnx, context.output, options.accuracy_limit,
                                   options.data_dir)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    compared = comparisons(rows)
    report = BenchReport(
        format=FORMAT,
        name=options.name or (context.run.name if context else server.models[0]),
        created=now_iso(),
        run=context.record() if context else None,
        server={**server.record, "url": server.url, "models": describe(swept.served)},
        settings=_settings(sweep, swept),
        machine=swept.machine,
        flops={"per_image": swept.flops, "matmul": swept.peak,
               "counted_with": "torch.utils.flop_counter.FlopCounterMode, MHA fast path off, 2 FLOPs per MAC"},
        accuracy=accuracy,
        accuracy_by_kind={k: accuracy_of(accuracy, "patched" if k == BYTES_KIND else k) for k in kinds},
        results=rows,
        comparisons=compared,
        targets=targets(compared),
        notes=_notes(rows),
    )
    write_report(report, Path(options.out_dir), latency_throughput_plot)
    return report
