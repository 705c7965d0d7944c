"""Commands that ship runs: export to ONNX, write a Triton repository, serve it, classify and benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable
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
from patcher.cli.shared import DataDir, HiddenName, Url, comma_list, grpc_address, served_model
from patcher.export.openvocab import DEFAULT_LIMITS as LABEL_LIMITS
from patcher.triton.imaging import DEFAULT_LIMITS as IMAGE_LIMITS
from patcher.triton.repository.publish import DEFAULT_REPOSITORY as REPOSITORY


def export(
    run: Annotated[Path, typer.Argument(help="A run directory from `patcher build`.")],
    out: Annotated[Path | None, typer.Option(help="Export directory (default RUN/onnx).")] = None,
    fp16: Annotated[bool, typer.Option(help="Also write half-precision variants (float32 in and out).")] = False,
    int8: Annotated[bool, typer.Option(help="Also write int8 variants (onnxruntime dynamic quantisation).")] = False,
    optimize: Annotated[bool, typer.Option(help="Also apply onnxruntime's offline graph optimisation.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    tasks: Annotated[str, typer.Option(help="Comma-separated subset of the run's tasks (default all).")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace a different export already at --out.")] = False,
    accuracy_tolerance: Annotated[float | None, typer.Option(
        help="Points a variant's held-out accuracy may differ from PyTorch's per task (default: 1, or 2 images).")
    ] = None,
    data_dir: DataDir = None,
    text: Annotated[bool | None, typer.Option("--text/--no-text", help="The text tower (label sets at request "
                                                   "time), from the run's base model; default: when that model "
                                                   "loads with the run's weights.")] = None,
    open_clip: Annotated[Path | None, typer.Option(
        "--open-clip", help="Instead of ONNX: write the patched model as a folder open_clip loads "
                            "(create_model_and_transforms('local-dir:DIR')), with a model card.")] = None,
) -> None:
    """Export the patched and zero-shot classifiers to ONNX, verified against PyTorch on held-out images (or, with
    --open-clip, the patched model as an open_clip folder)."""
    import json

    if open_clip is not None:
        from patcher.export.open_clip_dir import write_open_clip_dir

        folder = write_open_clip_dir(run, open_clip, overwrite=overwrite)
        typer.echo(f"open_clip folder: {folder} (load it with open_clip.create_model_and_transforms"
                   f"('local-dir:{folder}'); model card: {folder / 'README.md'})")
        return

    from patcher.export.contract import EXPORT_JSON, ContentOptions, read_export_record
    from patcher.export.reuse import IMAGES_PER_TASK, check_target

    # a conflict with the export already at --out fails here, before torch is imported or anything is traced
    content = ContentOptions(tasks=comma_list(tasks), fp16=fp16, optimize=optimize, opset=opset,
                             images_per_task=IMAGES_PER_TASK, int8=int8, text_tower=bool(text))
    check_target(run, out, content, overwrite, ("text_tower",) if text is None else ())
    from patcher.stages.export import ExportOptions, export_run

    path = export_run(run, ExportOptions(out=out, fp16=fp16, int8=int8, optimize=optimize, opset=opset,
                                         accuracy_tolerance=accuracy_tolerance,
                                         tasks=comma_list(tasks) or None, overwrite=overwrite, data_dir=data_dir,
                                         text=text))
    record = read_export_record(path / EXPORT_JSON)
    for key, model in record.models.items():
        typer.echo(f"{key}: {path / model.file} ({model.bytes / 1e6:.1f} MB)")
    for key, report in record.parity["models"].items():
        typer.echo(f"parity {key}: {json.dumps(_parity_summary(report))}")
    if record.text is not None:
        for key, model in record.text.models.items():
            report = record.text.parity["models"][key]
            typer.echo(f"text {key}: {path / model.file} ({'trained' if model.trained else 'the base model'}'s tower, "
                       f"{report['prompts']} prompts, max |diff| {report['max_abs_diff']['text_embedding']:.1e}, "
                       f"heads vs the build's {max(report['head_max_cosine_diff'].values(), default=0.0):.1e})")
    typer.echo(f"export: {path}")


def _parity_summary(report: dict) -> dict:
    keys = ("max_abs_diff", "top1_agreement", "batch_sizes", "images", "passed")
    return {k: report[k] for k in keys if k in report}


Repository = Annotated[str, typer.Option(help="Model repository: a folder, or s3://BUCKET/PREFIX "
                                                   "(s3://http://HOST:PORT/BUCKET/PREFIX for other endpoints).")]


def triton(
    run: Annotated[Path, typer.Argument(help="A run directory (its onnx/ export) or an export directory.")],
    repo: Annotated[str, typer.Option(help="Model repository to write into: a folder or s3://BUCKET/PREFIX "
                                            "(s3://http://HOST:PORT/BUCKET/PREFIX).")] = str(REPOSITORY),
    model: Annotated[str | None, typer.Option(
        help="Name of the served entry: letters, digits, _ (default: the patch task).")] = None,
    name: HiddenName = None,
    backend: Annotated[str, typer.Option(help="python (bundled server) or onnxruntime (NVIDIA container).")] = "python",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch the server accepts.")] = 64,
    instances: Annotated[int, typer.Option(help="Model instances per model.")] = 1,
    max_queue_delay_us: Annotated[int, typer.Option(help="Batching delay, us (0: batch what is queued).")] = 0,
    gpu: Annotated[bool, typer.Option(help="Run the classifiers' instances on the GPU (KIND_GPU; python backend: "
                                           "needs onnxruntime-gpu where tritonserver runs).")] = False,
    tensorrt: Annotated[bool, typer.Option(help="onnxruntime's TensorRT provider (onnxruntime backend, GPU).")] = False,
    tensorrt_fp16: Annotated[bool, typer.Option(help="TensorRT in FP16 (implies --tensorrt).")] = False,
    tensorrt_workspace: Annotated[int | None, typer.Option(help="TensorRT builder workspace, bytes.")] = None,
    tensorrt_cache: Annotated[str | None, typer.Option(help="Folder on the server host for TensorRT engine and "
                                                            "timing caches (reused by later loads).")] = None,
    warmup: Annotated[bool, typer.Option(help="Warm each new version on the export's sample image before it "
                                              "reports READY (model_warmup).")] = True,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 / int8 (exported with --fp16 / --int8).")] = "fp32",
    max_image_bytes: Annotated[int, typer.Option(help="Largest encoded image the server takes, bytes.")] = (
        IMAGE_LIMITS["max_bytes"]),
    max_image_pixels: Annotated[int, typer.Option(help="Most pixels (width x height), read from the header.")] = (
        IMAGE_LIMITS["max_pixels"]),
    max_aspect_ratio: Annotated[float, typer.Option(help="Longest side / shortest side at most.")] = (
        IMAGE_LIMITS["max_aspect"]),
    jpeg_draft: Annotated[bool, typer.Option(help="Decode large JPEGs at reduced scale (2x the model's size).")] = (
        IMAGE_LIMITS["jpeg_draft"]),
    max_labels: Annotated[int, typer.Option(help="Most labels in one open-vocabulary request.")] = (
        LABEL_LIMITS["max_labels"]),
    max_templates: Annotated[int, typer.Option(help="Most templates in one open-vocabulary request.")] = (
        LABEL_LIMITS["max_templates"]),
    max_prompts: Annotated[int, typer.Option(help="Most labels x templates in one open-vocabulary request.")] = (
        LABEL_LIMITS["max_prompts"]),
    label_cache: Annotated[int, typer.Option(help="Label sets whose heads the server keeps (0: none).")] = (
        LABEL_LIMITS["label_cache"]),
    truncate_prompts: Annotated[bool, typer.Option(help="Cut prompts longer than the context as open_clip does "
                                                        "(default: refuse them).")] = False,
    classify_instances: Annotated[int, typer.Option(help="Processes of the open-vocabulary model (0: --instances); "
                                                         "it takes no batches, each process has its own cache.")] = 0,
    max_request_bytes: Annotated[int, typer.Option(help="Most encoded bytes of all images of one request.")] = (
        IMAGE_LIMITS["max_request_bytes"]),
    max_request_pixels: Annotated[int, typer.Option(help="Most pixels one request's images decode to.")] = (
        IMAGE_LIMITS["max_request_pixels"]),
    max_server_pixels: Annotated[int, typer.Option(help="Most pixels the server decodes at once, all requests.")] = (
        IMAGE_LIMITS["max_server_pixels"]),
) -> None:
    """Write an export into a Triton model repository as a new version of every model of one entry (all or none)."""
    from patcher.triton.repository.configs import TensorRT
    from patcher.triton.repository.writer import RepositoryOptions, write_repository

    export_dir = run / "onnx" if (run / "onnx").is_dir() else run
    limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels, "max_aspect": max_aspect_ratio,
              "jpeg_draft": jpeg_draft, "max_request_bytes": max_request_bytes,
              "max_request_pixels": max_request_pixels, "max_server_pixels": max_server_pixels}
    tensorrt_options = (TensorRT(tensorrt_fp16, tensorrt_workspace, tensorrt_cache)
                        if tensorrt or tensorrt_fp16 or tensorrt_workspace or tensorrt_cache else None)
    open_vocab = {"max_labels": max_labels, "max_templates": max_templates, "max_prompts": max_prompts,
                  "label_cache": label_cache, "truncate_prompts": truncate_prompts,
                  "classify_instances": classify_instances}
    options = RepositoryOptions(name=served_model(model, name), backend=backend, max_batch_size=max_batch_size,
                                instances=instances, max_queue_delay_us=max_queue_delay_us, precision=precision,
                                limits=limits, warmup=warmup, gpu=gpu, tensorrt=tensorrt_options,
                                open_vocab=open_vocab)
    result = write_repository(export_dir, repo, options)
    for line in result.recovered:
        typer.echo(line)
    typer.echo(result.message)
    for model, entry in result.models.items():
        typer.echo(f"  {model} ({entry.kind}): versions {entry.versions}")


def serve(
    repo: Repository = str(REPOSITORY),
    models: Annotated[str, typer.Option(help="Comma-separated models to load (default all, and new ones).")] = "",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (0: a free one).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: a free one).")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Metrics port (0: a free one).")] = 8002,
    log: Annotated[Path | None, typer.Option(help="Server log file.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Where to keep the control key (default: the cache).")] = None,
    grpc_front: Annotated[str, typer.Option(
        help="gRPC front: auto (compiled where Go is installed), native or python.")] = "auto",
) -> None:
    """Serve a model repository with the bundled Triton until Ctrl-C or SIGTERM: control plane closed by a key,
    committed updates rolled out, dead backends reloaded."""
    # tritonserver is started (fork, then exec) while the fronts' threads run: gRPC's fork handlers have nothing to
    # do, and gRPC reads this when it is imported, so before the serving modules are
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    from patcher.triton.serving.foreground import ServeOptions, serve_forever
    from patcher.triton.serving.ports import distinct_free_ports

    spare = iter(distinct_free_ports(3, host))
    http_port, grpc_port, metrics_port = (value or next(spare) for value in (http_port, grpc_port, metrics_port))
    serve_forever(repo, ServeOptions(models=comma_list(models) or None, host=host, http_port=http_port,
                                     grpc_port=grpc_port, metrics_port=metrics_port, log_path=log, key_file=key_file,
                                     grpc_front=grpc_front))


def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, PPM).")],
    model: Annotated[str | None, typer.Option(help="Served entry (the ensemble, e.g. the patch task).")] = None,
    url: Url = "127.0.0.1:8001",
    top_k: Annotated[int, typer.Option(help="Labels per task.")] = 3,
    raw: Annotated[bool, typer.Option(help="Preprocess here and send tensors to <model>_patched.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    key_file: Annotated[Path | None, typer.Option(help="The server's key file (lists its models on a typo).")] = None,
    labels: Annotated[str, typer.Option(help="Comma-separated labels to classify against (open vocabulary).")] = "",
    templates: Annotated[str | None, typer.Option(
        help="With --labels: templates inline ('a photo of a {}.', several joined by |), a file with one per line, "
             "or a task's.")] = None,
    run: Annotated[Path | None, typer.Option(help="Classify in this process with RUN's export (no server).")] = None,
) -> None:
    """Classify image files with a served model over gRPC (or a run's export in process); top-k labels and scores
    per task, or against a label set given now (--labels)."""
    import json

    from patcher.triton.client import ClassifyOptions, Endpoint, classify_files
    from patcher.triton.openvocab_client import classify_labels, served_templates

    endpoint, options = Endpoint(url=url, key_file=key_file), ClassifyOptions(top_k=top_k, batch_size=batch_size)
    label_list = comma_list(labels)
    if labels.strip() and not label_list:
        raise PatcherError(f"--labels {labels!r} names no label: pass comma-separated labels, e.g. --labels cat,dog")
    unreadable = [label for label in label_list if not any(c.isprintable() and not c.isspace() for c in label)]
    if unreadable:
        raise PatcherError(f"--labels: {unreadable[0]!r} has only control characters: nothing to match an image to")
    if raw and (label_list or run is not None):
        raise PatcherError("--raw sends preprocessed tensors to a served <model>_patched: not with --labels or --run")
    if templates is not None and not label_list:
        raise PatcherError("--templates needs --labels: the baked tasks have their templates already")
    if (model is None) == (run is None):
        raise PatcherError("pass --model NAME (a served model) or --run RUN (in process)")
    _inline_templates(templates)  # checked before any model loads
    if run is not None:
        results = _classify_in_process(images, run, label_list, templates, top_k)
    elif label_list:
        chosen = _templates(templates, lambda: served_templates(model or "", endpoint))
        results = classify_labels(images, model, label_list, chosen, endpoint=endpoint, options=options)
    else:
        results = classify_files(images, model, endpoint=endpoint, options=options, raw=raw)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for result in results:
        typer.echo(f"{result['file']}:")
        for task, ranked in result["tasks"].items():
            shown = ", ".join(f"{entry['label']} ({entry['score']:.2f}{_probability(entry)})" for entry in ranked)
            typer.echo(f"  {task}: {shown}")


def _probability(entry: dict) -> str:
    return f", p={entry['probability']:.3f}" if "probability" in entry else ""


def _templates(spec: str | None, known: Callable[[], dict[str, list[str]]]) -> list[str] | None:
    """--templates: a file, a task of the model's run, or a registered task (its published templates)."""
    from patcher.triton.openvocab_client import resolve_templates

    if spec is None:
        return None
    inline = _inline_templates(spec)
    if inline is not None:
        return inline
    found = resolve_templates(spec, known())
    if found is not None:
        return found
    from patcher.data.tasks import get_task  # a task the run does not have: the registry (imports torch)

    try:
        return list(get_task(spec).templates)
    except PatcherError:
        raise PatcherError(f"--templates {spec!r} is neither a file nor a known task: pass a file with one "
                           "template per line (each with {}) or a task name (`patcher tasks`)") from None


def _inline_templates(spec: str | None) -> list[str] | None:
    """--templates given inline ("a photo of a {}.", several joined by |), checked; None for a file or task name."""
    if spec is None or ("{" not in spec and "}" not in spec):
        return None
    inline = [template.strip() for template in spec.split("|")]
    for template in inline:
        rest = template.replace("{}", "", 1)
        if "{}" not in template or "{" in rest or "}" in rest:
            raise PatcherError(f"--templates: {template!r} needs exactly one {{}} for the label and no other "
                               "braces, e.g. 'a photo of a {}.' (several: join them with |)")
    return inline


def _classify_in_process(images: list[Path], run: Path, labels: list[str], templates: str | None,
                         top_k: int) -> list[dict]:
    from patcher.triton.onnxruntime_local import LocalModel, label_set
    from patcher.triton.openvocab_client import read_images

    local = LocalModel(run)
    names = [str(path) for path in images]
    blobs = read_images(images)
    if labels:
        chosen = label_set(labels, _templates(templates, lambda: local.templates))
        ranked = local.classify_labels(blobs, names, chosen, top_k)
        tasks = [{"labels": entry} for entry in ranked]
    else:
        tasks = local.classify_tasks(blobs, names, top_k)
    return [{"file": name, "model": f"{local.path} (in process)", "version": local.record.run.name, "tasks": entry}
            for name, entry in zip(names, tasks, strict=True)]


def embed(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files (JPEG, PNG, PPM).")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A prompt to embed (repeat for more).")] = None,
    model: Annotated[str | None, typer.Option(help="Served entry name (e.g. the patch task).")] = None,
    run: Annotated[Path | None, typer.Option(help="Embed in this process with RUN's export (no server).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write .npy (float32 [N, D]) or .json; default JSON on stdout.")] = (
        None),
    url: Url = "127.0.0.1:8001",
    batch_size: Annotated[int, typer.Option(help="Items per request.")] = 16,
    key_file: Annotated[Path | None, typer.Option(help="The server's key file (lists its models on a typo).")] = None,
) -> None:
    """L2-normalised embeddings of image files, or of prompts (--text), from the patched model: served over gRPC
    (--model) or in process (--run)."""
    import json

    from patcher.triton.client import Endpoint
    from patcher.triton.openvocab_client import embed_files, embed_texts, embedding_records, save_embeddings

    if bool(images) == bool(text):
        raise PatcherError("pass image files or --text prompts (one kind per call)")
    if (model is None) == (run is None):
        raise PatcherError("pass --model NAME (a served entry) or --run RUN (in process)")
    keys = [str(path) for path in images] if images else list(text or [])
    what = "file" if images else "text"
    if run is not None:
        from patcher.triton.onnxruntime_local import LocalModel
        from patcher.triton.openvocab_client import read_images

        local = LocalModel(run)
        array = local.embed_images(read_images(images), keys) if images else local.embed_texts(keys)
    elif images:
        array = embed_files(images, model or "", endpoint=Endpoint(url=url, key_file=key_file), batch_size=batch_size)
    else:
        array = embed_texts(keys, model or "", endpoint=Endpoint(url=url, key_file=key_file), batch_size=batch_size)
    if out is None:
        typer.echo(json.dumps(embedding_records(keys, array, what)))
        return
    save_embeddings(out, keys, array, what)
    typer.echo(f"wrote {out}: {array.shape[0]} x {array.shape[1]} float32 embeddings ({what}s in the order given)")


WIDE_TABLE = 140  # columns the bench table needs before rich squeezes its cells


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PatcherError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def bench(
    run: Annotated[Path | None, typer.Argument(help="A run directory (starts the bundled server itself).")] = None,
    url: Annotated[str | None, typer.Option(callback=grpc_address, help="Benchmark an already running server "
                                                                          "instead (HOST:PORT).")] = None,
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
    int8: Annotated[bool, typer.Option(help="With RUN: also serve and measure the int8 patched graph.")] = False,
) -> None:
    """Throughput and latency of patched against zero-shot (and the alternatives), served by Triton."""
    from rich.console import Console

    from patcher.benchmark.measure import BenchOptions
    from patcher.benchmark.report import COLUMNS, format_table, row_cells
    from patcher.benchmark.sweep import SweepOptions
    from patcher.stages.bench import ServingOptions, bench_run, bench_url

    sweep = SweepOptions(_int_list(concurrency), _int_list(batch_sizes), duration, max_requests, shared_memory)
    options = BenchOptions(sweep=sweep, out_dir=out, tolerate_failures=tolerate_failures, name=name)
    if (run is None) == (url is None):
        raise PatcherError("pass either a run directory or --url HOST:PORT with --models")
    if run is not None:
        report = bench_run(run, options, ServingOptions(include_int8=int8))
    else:
        model_list = comma_list(models)
        if not model_list:
            raise PatcherError("--url needs --models A,B (the served model names to compare)")
        report = bench_url(url, model_list, options, key_file=key_file)
    console = Console()
    table = format_table(report)
    if console.width >= WIDE_TABLE:
        console.print(table)
        return
    for row in report.results:  # a narrow terminal: one line per measurement, every column named
        typer.echo("; ".join(f"{column} {cell}" for column, cell in zip(COLUMNS, row_cells(report, row), strict=True)))
