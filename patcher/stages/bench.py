"""`patcher bench`: the recipe that serves a run and measures it, or measures a server already running.

Read top to bottom, `bench_run`: setup (SIGTERM unwinds, a scratch folder; the run exported if RUN/onnx is
missing, its graphs and the output-space ensemble built: `benchmark/context.py`), the repository written
(`triton/repository/writer.py`: `patcher triton`'s, plus the ensemble baseline and threads set), tritonserver
started on free ports (`triton/serving/server.py`), the sweep and its report (`benchmark/measure.py`), then
cleanup: the server stopped and the scratch folder removed on every way out.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.scratch import scratch_dir
from patcher.benchmark.context import RunContext, checked_export, prepare_run
from patcher.benchmark.defaults import DEFAULT_MAX_QUEUE_DELAY_US, INT8_KIND
from patcher.benchmark.measure import BenchOptions, BenchServer, choose_threads, measure
from patcher.benchmark.outensemble import KIND as OUTENSEMBLE
from patcher.benchmark.report import BenchReport
from patcher.benchmark.sweep import Sweep
from patcher.runs.manifest import Run, load_run

WORKDIR_PREFIX = "patcher-bench-"  # in the temporary directory; ones left by killed benches are swept
TRITONSERVER = "nvidia-pytriton 0.7.0 bundle (Triton 2.51, python backend)"


@dataclass(frozen=True, kw_only=True)
class ServingOptions:
    """How `bench_run` serves the run: which baselines beside patched and zero-shot (output-space ensemble, int8,
    PNG bytes through the preprocessing ensemble), Triton's instances and batching delay, intra-op threads."""

    include_ensemble_baseline: bool = True
    include_int8: bool = False
    include_image_bytes: bool = True
    instances: int = 1
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    intra_op_threads: int | str = 1  # "auto": calibrated in process


class _Terminated(BaseException):
    """SIGTERM arrived: unwind, so that the server bench_run started and the temporary folders go with it."""


class Stopped(PatcherError):
    """`patcher bench` ended by SIGTERM, everything it started removed; exits 143 as a SIGTERM-ed process does."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
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


def ensure_export(run: Run, int8: bool = False) -> Path:
    """RUN/onnx, exported now if it is missing (with int8 variants if `int8`); PatcherError if it belongs to another
    manifest."""
    if not (run.path / "onnx" / "export.json").is_file():
        from patcher.stages.export import ExportOptions, export_run

        export_run(run.path, ExportOptions(int8=int8))
    export_dir, _ = checked_export(run)
    return export_dir


def _repository(context: RunContext, repo: Path, sweep: Sweep, serving: ServingOptions, threads: int
                ) -> dict[str, Any]:
    """The model repository bench_run serves: `patcher triton`'s, with `<name>_outensemble` and threads set."""
    from patcher.triton.repository.writer import RepositoryOptions, write_repository

    max_batch = max(64, *sweep.batch_sizes)
    extra = {kind: context.onnx[kind] for kind in (OUTENSEMBLE, INT8_KIND) if kind in context.onnx}
    options = RepositoryOptions(max_batch_size=max_batch, instances=serving.instances,
                                max_queue_delay_us=serving.max_queue_delay_us, intra_op_threads=threads,
                                extra_classifiers=extra)
    written = write_repository(context.export_dir, repo, options)
    return {"name": written.name, "max_batch_size": max_batch, "instances": serving.instances,
            "max_queue_delay_us": serving.max_queue_delay_us, "intra_op_threads": threads}


def _models(base: str, serving: ServingOptions) -> tuple[list[str], list[str]]:
    """(the models measured, the models the server loads) of an entry named `base`."""
    models = [f"{base}_patched", f"{base}_zeroshot"]
    if serving.include_ensemble_baseline:
        models.append(f"{base}_{OUTENSEMBLE}")
    if serving.include_int8:
        models.append(f"{base}_{INT8_KIND}")
    load = list(models)
    if serving.include_image_bytes:
        models.append(base)
        load += [f"{base}_preprocess", base]
    return models, load


def bench_run(run_path: Path, options: BenchOptions = BenchOptions(),
              serving: ServingOptions = ServingOptions()) -> BenchReport:
    """Serve a run (exported first if RUN/onnx is missing) with the bundled tritonserver on free ports and benchmark
    patched, zero-shot, output-space ensemble and image-bytes ensemble. Writes JSON, Markdown, PNG into out_dir;
    PatcherError if requests failed, unless tolerated. With `include_int8`, the export's int8 patched graph is
    served and measured beside them (`<name>_patched_int8`)."""
    from patcher.triton.serving.ports import distinct_free_ports
    from patcher.triton.serving.server import ServerPorts, ServerSettings, TritonServer

    plan = options.sweep.checked()
    with sigterm_unwinds(), scratch_dir(WORKDIR_PREFIX) as workdir:
        run = load_run(run_path)
        ensure_export(run, serving.include_int8)
        context = prepare_run(run, Path(workdir), outensemble=serving.include_ensemble_baseline,
                              int8=serving.include_int8)
        threads, calibration = choose_threads(context, serving.intra_op_threads, min(8, max(plan.batch_sizes)))
        repo = Path(workdir) / "repo"
        settings = _repository(context, repo, plan, serving, threads)
        models, load = _models(settings["name"], serving)
        http, grpc, metrics = distinct_free_ports(3)
        with TritonServer(repo, models=load, ports=ServerPorts(http=http, grpc=grpc, metrics=metrics),
                          settings=ServerSettings(startup_timeout_s=120)) as server:
            record = {"started_here": True, "tritonserver": TRITONSERVER, "repository": settings,
                      "threads_calibration": calibration}
            target = BenchServer(url=server.grpc_url, models=models, record=record, headers=server.key.grpc_headers,
                                 pgid=server.pgid, threads=threads)
            return measure(target, plan, context, options)


def bench_url(url: str, models: list[str], options: BenchOptions = BenchOptions(), *, run_path: Path | None = None,
              key_file: Path | None = None) -> BenchReport:
    """Benchmark models on an already running server (gRPC host:port); with `run_path` also FLOPs, accuracy and
    in-process baselines (the run exported first if it has no export). Writes `<name>`.json/.md/.png into out_dir
    and returns the report; PatcherError if requests failed, unless tolerated. The server's key (for shared memory)
    is read from `key_file`, else from the file `patcher serve` wrote for `url`, if any."""
    from patcher.triton.serving.access import find_key

    plan = options.sweep.checked()
    key = find_key(url, key_file)
    with sigterm_unwinds(), scratch_dir(WORKDIR_PREFIX) as workdir:
        context = None
        if run_path is not None:
            run = load_run(run_path)
            ensure_export(run)
            context = prepare_run(run, Path(workdir))
        target = BenchServer(url=url, models=list(models), headers=key.grpc_headers if key else None)
        return measure(target, plan, context, options)
