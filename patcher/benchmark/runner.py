"""`patcher bench`: serve a run (or use a running server), sweep, add in-process baselines, write one report."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tritonclient.utils import InferenceServerException

from patcher.base.errors import PatcherError
from patcher.base.files import now_iso
from patcher.base.progress import make_progress
from patcher.base.scratch import scratch_dir
from patcher.benchmark.accuracy import accuracy_of, accuracy_record
from patcher.benchmark.context import RunContext, prepare_run
from patcher.benchmark.defaults import (
    INT8_KIND,
)
from patcher.benchmark.flops import matmul_peak
from patcher.benchmark.inprocess import calibrate_threads
from patcher.benchmark.machine import load_average, machine_info
from patcher.benchmark.outensemble import KIND as OUTENSEMBLE
from patcher.benchmark.plots import latency_throughput_plot
from patcher.benchmark.report import write_report
from patcher.benchmark.results import FORMAT, comparisons, targets
from patcher.benchmark.sweep import Sweep, SweepOptions, inprocess_runners, run_sweep
from patcher.benchmark.targets import BYTES_KIND, ServedTarget, check_batches, describe, inspect_target

CLIENT = "closed loop: a thread per concurrency slot, blocking gRPC unary calls on one channel, request serialised once"
DEFAULT_OUT = Path("bench/results")
DEFAULT_MAX_QUEUE_DELAY_US = 0  # measured: 2000 makes every request wait 2 ms at low concurrency (bench/README.md)
THREADS_AUTO = "auto"
WORKDIR_PREFIX = "patcher-bench-"  # in the temporary directory; ones left by killed benches are swept


class _Terminated(BaseException):
    """SIGTERM arrived: unwind, so that the server bench_run started and the temporary folders go with it."""


class Stopped(PatcherError):
    """`patcher bench` ended by SIGTERM, everything it started removed; exits 143 as a SIGTERM-ed process does."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises (in the main thread), so every `with` on the way out cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except _Terminated:
        raise Stopped("patcher bench stopped by SIGTERM: the server it started and its temporary folders are "
                      "removed, no report was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def _bench(
    url: str,
    models: list[str],
    sweep: Sweep,
    out_dir: Path,
    name: str | None,
    context: RunContext | None,
    include_inprocess: bool,
    server: dict[str, Any],
    threads: int | None = None,
    server_pgid: int | None = None,
    data_dir: Path | None = None,
    accuracy_limit: int | None = 5000,
    headers: dict[str, str] | None = None,
    tolerate_failures: bool = False,
) -> dict[str, Any]:
    from patcher.triton.client import connect

    if not models:
        raise PatcherError("no models to benchmark: pass model names, e.g. digits_patched,digits_zeroshot")
    client = connect(url)
    previous_threads = torch.get_num_threads()
    try:
        served = [inspect_target(client, url, model, headers) for model in models]
        check_batches(served, list(sweep.batch_sizes), url)
        threads = _served_threads(served) if threads is None else threads
        machine = machine_info()
        peak_record = matmul_peak(threads if threads > 0 else torch.get_num_threads())
        peak = peak_record["peak_gflops"]
        flops = dict(context.flops) if context else {}
        if "patched" in flops:
            flops[BYTES_KIND] = flops["patched"]
        inprocess = bool(context and include_inprocess)
        local = inprocess_runners(context, threads) if inprocess and context else None
        slots = len(served) + (sum(2 if k in context.graphs else 1 for k in context.onnx) if local and context else 0)
        steps = len(sweep.batch_sizes) * len(sweep.concurrency) * sweep.rounds * slots
        if threads > 0:
            torch.set_num_threads(threads)
        with make_progress() as progress:
            bar = progress.add_task("benchmarking", total=steps, status="")

            def tick(status: str) -> None:
                progress.update(bar, advance=1, status=status)

            try:
                rows = run_sweep(url, client, served, sweep, flops, peak, server_pgid, local, tick, headers)
            except InferenceServerException as error:  # requests' own failures are counted per row, not raised
                raise PatcherError(
                    f"the server at {url} stopped answering during the sweep ({error.message()}): "
                    "see its log; nothing was written") from None
    finally:
        client.close()
        torch.set_num_threads(previous_threads)
    check_failures(rows, tolerate_failures)
    machine["load_average_end"] = load_average()
    accuracy = None
    if context is not None:
        accuracy = accuracy_record(context.run, context.onnx, context.output, accuracy_limit, data_dir)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    compared = comparisons(rows)
    report = {
        "format": FORMAT,
        "name": name or (context.run.name if context else models[0]),
        "created": now_iso(),
        "run": context.record() if context else None,
        "server": {**server, "url": url, "models": describe(served)},
        "settings": {
            **asdict(sweep),
            "client": CLIENT,
            "order": "ABBA" if sweep.rounds > 1 else "single window",
            "warmup_requests": "max(4, 2 x concurrency) per model and setting, not counted",
            "intra_op_threads": threads,
            "in_process": f"concurrency 1, {threads or 'default'} intra-op threads (onnxruntime and torch)"
            if inprocess
            else None,
        },
        "machine": machine,
        "flops": {"per_image": flops, "matmul": peak_record,
                  "counted_with": "torch.utils.flop_counter.FlopCounterMode, MHA fast path off, 2 FLOPs per MAC"},
        "accuracy": accuracy,
        "accuracy_by_kind": {k: accuracy_of(accuracy, "patched" if k == BYTES_KIND else k) for k in kinds},
        "results": rows,
        "comparisons": compared,
        "targets": targets(compared),
        "notes": _notes(rows),
    }
    write_report(report, out_dir, latency_throughput_plot)
    return report


def bench_url(
    url: str,
    models: list[str],
    sweep: SweepOptions = SweepOptions(),
    out_dir: Path = DEFAULT_OUT,
    name: str | None = None,
    run_path: Path | None = None,
    include_inprocess: bool = True,
    data_dir: Path | None = None,
    key_file: Path | None = None,
    tolerate_failures: bool = False,
) -> dict[str, Any]:
    """Benchmark models on an already running server (gRPC host:port); with `run_path` also FLOPs, accuracy and
    in-process baselines. Writes `<name>`.json/.md/.png into out_dir and returns the report; PatcherError if
    requests failed, unless `tolerate_failures`. The server's key (for shared memory) is read from `key_file`, else
    from the file `patcher serve` wrote for `url`, if any."""
    from patcher.triton.serving.access import find_key

    plan = sweep.checked()
    key = find_key(url, key_file)
    with _sigterm_unwinds(), scratch_dir(WORKDIR_PREFIX) as workdir:
        context = prepare_run(Path(run_path), Path(workdir)) if run_path is not None else None
        return _bench(url, list(models), plan, Path(out_dir), name, context, include_inprocess,
                      {"started_here": False}, data_dir=data_dir,
                      headers=key.grpc_headers if key else None, tolerate_failures=tolerate_failures)


def _repository(context: RunContext, repo: Path, sweep: Sweep, include_ensemble_baseline: bool, instances: int,
                max_queue_delay_us: int, threads: int) -> dict[str, Any]:
    """The model repository bench_run serves: `patcher triton`'s, with `<name>_outensemble` and threads set."""
    from patcher.triton.repository.writer import write_repository

    max_batch = max(64, *sweep.batch_sizes)
    extra = {kind: context.onnx[kind] for kind in (OUTENSEMBLE, INT8_KIND) if kind in context.onnx}
    written = write_repository(context.export_dir, repo, max_batch_size=max_batch, instances=instances,
                               max_queue_delay_us=max_queue_delay_us, intra_op_threads=threads,
                               extra_classifiers=extra)
    return {"name": written["name"], "max_batch_size": max_batch, "instances": instances,
            "max_queue_delay_us": max_queue_delay_us, "intra_op_threads": threads}


def bench_run(
    run_path: Path,
    sweep: SweepOptions = SweepOptions(),
    out_dir: Path = DEFAULT_OUT,
    include_ensemble_baseline: bool = True,
    include_inprocess: bool = True,
    name: str | None = None,
    include_int8: bool = False,
    include_image_bytes: bool = True,
    instances: int = 1,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    intra_op_threads: int | str = 1,
    data_dir: Path | None = None,
    tolerate_failures: bool = False,
) -> dict[str, Any]:
    """Serve a run (exported first if RUN/onnx is missing) with the bundled tritonserver on free ports and benchmark
    patched, zero-shot, output-space ensemble and image-bytes ensemble. Writes JSON, Markdown, PNG into out_dir;
    PatcherError if requests failed, unless `tolerate_failures`. With `include_int8`, the export's int8 patched
    graph is served and measured beside them (`<name>_patched_int8`)."""
    from patcher.triton.serving.ports import distinct_free_ports
    from patcher.triton.serving.server import TritonServer

    plan = sweep.checked()
    with _sigterm_unwinds(), scratch_dir(WORKDIR_PREFIX) as workdir:
        context = prepare_run(Path(run_path), Path(workdir), outensemble=include_ensemble_baseline, int8=include_int8)
        threads, calibration = choose_threads(context, intra_op_threads, min(8, max(plan.batch_sizes)))
        repo = Path(workdir) / "repo"
        settings = _repository(context, repo, plan, include_ensemble_baseline, instances, max_queue_delay_us,
                               threads)
        base = settings["name"]
        models = [f"{base}_patched", f"{base}_zeroshot"]
        if include_ensemble_baseline:
            models.append(f"{base}_{OUTENSEMBLE}")
        if include_int8:
            models.append(f"{base}_{INT8_KIND}")
        load = list(models)
        if include_image_bytes:
            models.append(base)
            load += [f"{base}_preprocess", base]
        http, grpc, metrics = distinct_free_ports(3)
        with TritonServer(repo, models=load, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          startup_timeout_s=120) as server:
            info = {"started_here": True, "tritonserver": "nvidia-pytriton 0.7.0 bundle (Triton 2.51, python backend)",
                    "repository": settings, "threads_calibration": calibration}
            return _bench(server.grpc_url, models, plan, Path(out_dir), name, context, include_inprocess, info,
                          threads=threads, server_pgid=server.pgid, data_dir=data_dir,
                          headers=server.key.grpc_headers, tolerate_failures=tolerate_failures)
