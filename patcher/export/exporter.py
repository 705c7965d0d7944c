"""`patcher export RUN`: ONNX models of a run's patched and zero-shot classifiers, verified, with export.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from patcher.data.tasks.checks import skipping_bad_images
from patcher.errors import PatcherError
from patcher.export.consistency import check_run
from patcher.export.graph import ExportGraph, load_graph, output_names_for, reference_outputs
from patcher.export.heldout import SPLIT, HeldOut, load_heldout
from patcher.export.metadata import (
    EXPORT_FORMAT,
    EXPORT_JSON,
    attach_metadata,
    export_record,
    io_record,
    metadata_props,
    model_alpha,
    model_key,
    model_record,
    options_record,
)
from patcher.export.onnx_export import (
    OPTIMIZATION_LEVEL,
    check_opset,
    export_onnx,
    optimize_onnx,
    save_onnx,
    to_fp16,
)
from patcher.export.verify import thresholds, verify_model
from patcher.progress import console, make_progress
from patcher.runs.locks import check_name
from patcher.runs.manifest import Run, load_run
from patcher.runs.store import clean_stale, output_directory, output_lock, sha256_file, write_errors, write_json

KINDS = ("patched", "zeroshot")
CONFIG_FILE = "open_clip_config.json"
DEFAULT_DIR = "onnx"
IMAGES_PER_TASK = 256


def weights_file(kind: str) -> str:
    """The run-relative path of a kind's classifier weights."""
    return f"models/{kind}.safetensors"


def select_tasks(run: Run, tasks: list[str] | None) -> list[str]:
    """The tasks to export, in the run's order unless given; PatcherError for a task the run lacks."""
    if tasks is None:
        return run.tasks
    chosen = list(dict.fromkeys(tasks))
    if not chosen:
        raise PatcherError("no tasks given: pass task names the run has, or none for all of them")
    unknown = [task for task in chosen if task not in run.tasks]
    if unknown:
        raise PatcherError(f"run {run.name} has no task {', '.join(unknown)}: it has {', '.join(run.tasks)}")
    return chosen


def existing_export(out: Path, run: Run, options: dict[str, Any], overwrite: bool) -> bool:
    """True when `out` already holds this export; PatcherError when it holds something it may not replace."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise PatcherError(f"{out} is a file, not a directory: pass another --out")
    record_path = out / EXPORT_JSON
    if not record_path.is_file():
        if any(out.iterdir()):
            raise PatcherError(f"{out} exists and is not a patcher export: refusing to replace it, pass another --out")
        return False
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        record = {}
    difference = _difference(record, run, options)
    if difference is None and _files_intact(out, record) and not overwrite:
        return True
    if overwrite:
        return False
    raise PatcherError(f"{out} holds a different export ({difference or 'files changed since'}): "
                       "pass --overwrite to replace it or another --out")


def _difference(record: dict[str, Any], run: Run, options: dict[str, Any]) -> str | None:
    if record.get("format") != EXPORT_FORMAT:
        return f"format {record.get('format')!r}"
    previous_run = record.get("run", {})
    if previous_run.get("manifest_sha256") != run.manifest_sha256:
        return f"of run {previous_run.get('name')!r} with another manifest"
    previous = record.get("options", {})
    changed = [f"{key} {previous.get(key)!r} -> {value!r}" for key, value in options.items()
               if previous.get(key) != value]
    return ", ".join(changed) or None


def _files_intact(out: Path, record: dict[str, Any]) -> bool:
    models = record.get("models", {})
    return bool(models) and all(
        (out / entry["file"]).is_file() and sha256_file(out / entry["file"]) == entry.get("sha256")
        for entry in models.values()
    )


def export_run(
    run_path: Path,
    out: Path | None = None,
    fp16: bool = False,
    optimize: bool = False,
    opset: int = 17,
    tasks: list[str] | None = None,
    overwrite: bool = False,
    data_dir: Path | None = None,
    images_per_task: int = IMAGES_PER_TASK,
) -> Path:
    """Export a run's patched and zero-shot classifiers to verified ONNX models; returns the export directory.

    The manifest is checked against the weights first; `out` is locked while it is written, and what a killed
    export left beside it is removed; a fault while writing (a full disk) is one PatcherError, nothing written.
    """
    started = time.perf_counter()
    check_opset(opset)
    if images_per_task < 1:
        raise PatcherError(f"images per task must be at least 1, got {images_per_task}")
    run = load_run(run_path)
    selected = select_tasks(run, tasks)
    output_names_for(selected)
    out = Path(out) if out is not None else run.path / DEFAULT_DIR
    check_name(out)
    options = options_record(selected, fp16, optimize, opset, images_per_task)
    config_path = run.verified_file(CONFIG_FILE)
    weights = {kind: run.verified_file(weights_file(kind)) for kind in KINDS}
    config = json.loads(config_path.read_text())
    check_run(run, config, weights, selected)
    with output_lock(out):
        with write_errors(out):
            clean_stale(out)
        if existing_export(out, run, options, overwrite):
            console.print(f"{out} is up to date: same run and options, nothing to do")
            return out
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        skip = bool(run.manifest.get("training", {}).get("data", {}).get("skip_bad_images", False))
        with skipping_bad_images(skip):  # the files the build left out, the parity check leaves out too
            heldout = load_heldout(selected, config["preprocess_cfg"], images_per_task, data_dir)
        timings["images"] = time.perf_counter() - tick
        with output_directory(out, overwrite=out.exists()) as staging:
            models, reports, widths = _export_models(staging, run, config, weights, selected, options, heldout,
                                                     timings)
            parity = {"split": SPLIT, "thresholds": thresholds(), "models": reports}
            io = io_record(run.manifest["model"]["preprocess"], widths, selected)
            timings["total"] = time.perf_counter() - started
            write_json(staging / EXPORT_JSON, export_record(run, selected, options, io, models, parity, timings))
    return out


def _export_models(
    staging: Path,
    run: Run,
    config: dict[str, Any],
    weights: dict[str, Path],
    tasks: list[str],
    options: dict[str, Any],
    heldout: HeldOut,
    timings: dict[str, float],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Write and verify every model; their export.json records, parity reports, and output widths."""
    precisions = ["fp32", "fp16"] if options["fp16"] else ["fp32"]
    optimization = OPTIMIZATION_LEVEL if options["optimize"] else None
    image_size = tuple(run.manifest["model"]["preprocess"]["image_size"])
    models: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    widths: dict[str, int] = {}
    with make_progress() as progress:
        bar = progress.add_task("exporting", total=len(KINDS) * len(precisions), status="")
        for kind in KINDS:
            tick = time.perf_counter()
            graph = load_graph(config, weights[kind], tasks)
            reference = reference_outputs(graph, heldout.images)
            _add(timings, "torch_reference", time.perf_counter() - tick)
            widths = graph.output_widths()
            progress.update(bar, status=f"{kind}.onnx")
            paths = _write_model(staging, graph, kind, run, options, image_size, optimization, timings)
            for precision, path in paths.items():
                progress.update(bar, status=f"checking {path.name}")
                tick = time.perf_counter()
                report = verify_model(path, precision, graph, heldout, reference)
                _add(timings, "verify", time.perf_counter() - tick)
                key = model_key(kind, precision)
                reports[key] = report
                models[key] = model_record(path, kind, precision, model_alpha(run, kind), optimization)
                progress.advance(bar)
    return models, reports, widths


def _write_model(
    staging: Path,
    graph: ExportGraph,
    kind: str,
    run: Run,
    options: dict[str, Any],
    image_size: tuple[int, ...],
    optimization: str | None,
    timings: dict[str, float],
) -> dict[str, Path]:
    """Write `<kind>.onnx` and, with fp16, `<kind>_fp16.onnx` (converted from the final float32 graph)."""
    tasks, opset = options["tasks"], options["opset"]
    path = staging / f"{model_key(kind, 'fp32')}.onnx"
    tick = time.perf_counter()
    traced = staging / f".{kind}.traced.onnx"
    model = export_onnx(graph, traced, (int(image_size[0]), int(image_size[1])), opset)
    _add(timings, "torch_export", time.perf_counter() - tick)
    if optimization:
        tick = time.perf_counter()
        save_onnx(model, traced)  # with the shapes set_io_shapes fixed in memory
        model = optimize_onnx(traced, path)
        _add(timings, "optimize", time.perf_counter() - tick)
    traced.unlink()
    attach_metadata(model, metadata_props(run, kind, "fp32", opset, tasks, optimization))
    save_onnx(model, path)
    paths = {"fp32": path}
    if options["fp16"]:
        tick = time.perf_counter()
        half = to_fp16(model)
        attach_metadata(half, metadata_props(run, kind, "fp16", opset, tasks, optimization))
        paths["fp16"] = staging / f"{model_key(kind, 'fp16')}.onnx"
        save_onnx(half, paths["fp16"])
        _add(timings, "fp16", time.perf_counter() - tick)
    return paths


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds
