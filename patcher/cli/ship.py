"""Commands that ship runs: export to ONNX, write a Triton repository, serve it, classify and benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patcher.base.errors import PatcherError
from patcher.benchmark.defaults import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    DEFAULT_MAX_REQUESTS,
)
from patcher.cli.app import DataDir, comma_list, command
from patcher.triton.imaging import DEFAULT_LIMITS
from patcher.triton.repository.publish import DEFAULT_REPOSITORY as REPOSITORY


@command
def export(
    run: Annotated[Path, typer.Argument(help="A run directory from `patcher build`.")],
    out: Annotated[Path | None, typer.Option(help="Export directory (default RUN/onnx).")] = None,
    fp16: Annotated[bool, typer.Option(help="Also write half-precision variants (float32 in and out).")] = False,
    int8: Annotated[bool, typer.Option(help="Also write int8 variants (onnxruntime dynamic quantisation).")] = False,
    optimize: Annotated[bool, typer.Option(help="Also apply onnxruntime's offline graph optimisation.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    tasks: Annotated[str, typer.Option(help="Comma-separated subset of the run's tasks (default all).")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace a different export already at --out.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Export the patched and zero-shot classifiers to ONNX, verified against PyTorch on held-out images."""
    import json

    from patcher.export.contract import EXPORT_JSON, read_export_record
    from patcher.stages.export import ExportOptions, export_run

    path = export_run(run, ExportOptions(out=out, fp16=fp16, int8=int8, optimize=optimize, opset=opset,
                                         tasks=comma_list(tasks) or None, overwrite=overwrite, data_dir=data_dir))
    record = read_export_record(path / EXPORT_JSON)
    for key, model in record.models.items():
        typer.echo(f"{key}: {path / model.file} ({model.bytes / 1e6:.1f} MB)")
    for key, report in record.parity["models"].items():
        typer.echo(f"parity {key}: {json.dumps(_parity_summary(report))}")
    typer.echo(f"export: {path}")


def _parity_summary(report: dict) -> dict:
    keys = ("max_abs_diff", "top1_agreement", "batch_sizes", "images", "passed")
    return {k: report[k] for k in keys if k in report}


Repository = Annotated[Path, typer.Option(help="Model repository.")]


@command
def triton(
    run: Annotated[Path, typer.Argument(help="A run directory (its onnx/ export) or an export directory.")],
    repo: Annotated[Path, typer.Option(help="Model repository to write into.")] = REPOSITORY,
    name: Annotated[str | None, typer.Option(help="Entry name: letters, digits, _ (default: the patch task).")] = None,
    backend: Annotated[str, typer.Option(help="python (bundled server) or onnxruntime (NVIDIA container).")] = "python",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch the server accepts.")] = 64,
    instances: Annotated[int, typer.Option(help="Model instances per model.")] = 1,
    max_queue_delay_us: Annotated[int, typer.Option(help="Batching delay, us (0: batch what is queued).")] = 0,
    tensorrt_fp16: Annotated[bool, typer.Option(help="TensorRT FP16 accelerator (onnxruntime backend, GPU).")] = False,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 for an export made with --fp16.")] = "fp32",
    max_image_bytes: Annotated[int, typer.Option(help="Largest encoded image the server takes, bytes.")] = (
        DEFAULT_LIMITS["max_bytes"]),
    max_image_pixels: Annotated[int, typer.Option(help="Most pixels (width x height), read from the header.")] = (
        DEFAULT_LIMITS["max_pixels"]),
    max_aspect_ratio: Annotated[float, typer.Option(help="Longest side / shortest side at most.")] = (
        DEFAULT_LIMITS["max_aspect"]),
    jpeg_draft: Annotated[bool, typer.Option(help="Decode large JPEGs at reduced scale (2x the model's size).")] = (
        DEFAULT_LIMITS["jpeg_draft"]),
    max_request_bytes: Annotated[int, typer.Option(help="Most encoded bytes of all images of one request.")] = (
        DEFAULT_LIMITS["max_request_bytes"]),
    max_request_pixels: Annotated[int, typer.Option(help="Most pixels one request's images decode to.")] = (
        DEFAULT_LIMITS["max_request_pixels"]),
    max_server_pixels: Annotated[int, typer.Option(help="Most pixels the server decodes at once, all requests.")] = (
        DEFAULT_LIMITS["max_server_pixels"]),
) -> None:
    """Write an export into a Triton model repository as a new version of every model of one entry (all or none)."""
    from patcher.triton.repository.writer import write_repository

    export_dir = run / "onnx" if (run / "onnx").is_dir() else run
    limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels, "max_aspect": max_aspect_ratio,
              "jpeg_draft": jpeg_draft, "max_request_bytes": max_request_bytes,
              "max_request_pixels": max_request_pixels, "max_server_pixels": max_server_pixels}
    result = write_repository(export_dir, repo, name=name, backend=backend, max_batch_size=max_batch_size,
                              instances=instances, max_queue_delay_us=max_queue_delay_us,
                              tensorrt_fp16=tensorrt_fp16, precision=precision, limits=limits)
    for line in result["recovered"]:
        typer.echo(line)
    typer.echo(result["message"])
    for model, entry in result["models"].items():
        typer.echo(f"  {model} ({entry['kind']}): versions {entry['versions']}")


@command
def serve(
    repo: Repository = REPOSITORY,
    models: Annotated[str, typer.Option(help="Comma-separated models to load (default all, and new ones).")] = "",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (0: a free one).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: a free one).")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Metrics port (0: a free one).")] = 8002,
    log: Annotated[Path | None, typer.Option(help="Server log file.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Where to keep the control key (default: the cache).")] = None,
) -> None:
    """Serve a model repository with the bundled Triton until Ctrl-C or SIGTERM: control plane closed by a key,
    committed updates rolled out, dead backends reloaded."""
    from patcher.triton.serving.foreground import serve_forever
    from patcher.triton.serving.ports import distinct_free_ports

    spare = iter(distinct_free_ports(3, host))
    http_port, grpc_port, metrics_port = (value or next(spare) for value in (http_port, grpc_port, metrics_port))
    serve_forever(repo, comma_list(models) or None, host, http_port, grpc_port, metrics_port, log,
                  key_file=key_file)


@command
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, PPM).")],
    model: Annotated[str, typer.Option(help="Served model name (the ensemble, e.g. the patch task).")],
    url: Annotated[str, typer.Option(help="Triton gRPC address.")] = "127.0.0.1:8001",
    top_k: Annotated[int, typer.Option(help="Labels per task.")] = 3,
    raw: Annotated[bool, typer.Option(help="Preprocess here and send tensors to <model>_patched.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    key_file: Annotated[Path | None, typer.Option(help="The server's key file (lists its models on a typo).")] = None,
) -> None:
    """Classify image files with a served model over gRPC; top-k labels and scores per task."""
    import json

    from patcher.triton.client import classify_files

    results = classify_files(images, model, url=url, top_k=top_k, raw=raw, batch_size=batch_size, key_file=key_file)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for result in results:
        typer.echo(f"{result['file']}:")
        for task, labels in result["tasks"].items():
            shown = ", ".join(f"{entry['label']} ({entry['score']:.2f})" for entry in labels)
            typer.echo(f"  {task}: {shown}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PatcherError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


@command
def bench(
    run: Annotated[Path | None, typer.Argument(help="A run directory (starts the bundled server itself).")] = None,
    url: Annotated[str | None, typer.Option(help="Benchmark an already running server instead.")] = None,
    models: Annotated[str, typer.Option(help="With --url: comma-separated model names.")] = "",
    concurrency: Annotated[str, typer.Option(help="Concurrent requests to sweep.")] = _csv(DEFAULT_CONCURRENCY),
    batch_sizes: Annotated[str, typer.Option(help="Client batch sizes to sweep.")] = _csv(DEFAULT_BATCH_SIZES),
    duration: Annotated[float, typer.Option(help="Seconds per setting (bounded also by --max-requests).")] = (
        DEFAULT_DURATION_S),
    max_requests: Annotated[int, typer.Option(help="Requests per setting at most.")] = DEFAULT_MAX_REQUESTS,
    shared_memory: Annotated[bool, typer.Option(help="Send inputs through system shared memory.")] = False,
    out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG go.")] = Path("bench/results"),
    name: Annotated[str | None, typer.Option(help="Report name (default: the run's name).")] = None,
    tolerate_failures: Annotated[bool, typer.Option(help="Report even if requests failed.")] = False,
    key_file: Annotated[Path | None, typer.Option(help="With --url: the server's key file (for shared memory).")] = (
        None),
) -> None:
    """Throughput and latency of patched against zero-shot (and the alternatives), served by Triton."""
    from rich.console import Console

    from patcher.benchmark.report import format_table
    from patcher.benchmark.runner import bench_run, bench_url

    sweep = {"concurrency": _int_list(concurrency), "batch_sizes": _int_list(batch_sizes),
             "duration_s": duration, "max_requests": max_requests, "shared_memory": shared_memory,
             "out_dir": out, "tolerate_failures": tolerate_failures}
    if (run is None) == (url is None):
        raise PatcherError("pass either a run directory or --url HOST:PORT with --models")
    if run is not None:
        report = bench_run(run, name=name, **sweep)
    else:
        model_list = comma_list(models)
        if not model_list:
            raise PatcherError("--url needs --models A,B (the served model names to compare)")
        report = bench_url(url, model_list, name=name, key_file=key_file, **sweep)
    Console().print(format_table(report))
