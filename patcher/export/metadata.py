"""What an export says about itself: ONNX metadata_props on each model and the export.json beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from patcher import __version__
from patcher.export.graph import EMBEDDING_OUTPUT, INPUT_NAME
from patcher.export.naming import logits_output
from patcher.runs.manifest import Run, now_iso, versions
from patcher.runs.store import file_record

EXPORT_FORMAT = "patcher-export/1"
EXPORT_JSON = "export.json"
METADATA_PREFIX = "patcher."
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"


def model_key(kind: str, precision: str) -> str:
    """The key and file stem of a model: `patched`, `zeroshot_fp16`, ..."""
    return kind if precision == "fp32" else f"{kind}_{precision}"


def options_record(tasks: list[str], fp16: bool, optimize: bool, opset: int, images_per_task: int) -> dict[str, Any]:
    """The options that decide an export's content: a second export with the same ones is up to date."""
    return {"tasks": list(tasks), "fp16": fp16, "optimize": optimize, "opset": opset,
            "images_per_task": images_per_task}


def io_record(preprocess: dict[str, Any], widths: dict[str, int], tasks: list[str]) -> dict[str, Any]:
    """export.json's `input` and `outputs`: names, dtypes, shapes with -1 for the batch."""
    height, width = preprocess["image_size"]
    outputs = [{"name": EMBEDDING_OUTPUT, "dtype": "float32", "shape": [-1, widths[EMBEDDING_OUTPUT]]}]
    for task in tasks:
        name = logits_output(task)
        outputs.append({"name": name, "dtype": "float32", "shape": [-1, widths[name]], "task": task})
    return {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [-1, 3, int(height), int(width)]},
        "outputs": outputs,
    }


def tasks_record(run: Run, tasks: list[str]) -> dict[str, Any]:
    """Role, class names and output tensor of each exported task, in output order."""
    return {
        task: {
            "role": run.manifest["tasks"][task].get("role", "support"),
            "classnames": list(run.manifest["tasks"][task]["classnames"]),
            "output": logits_output(task),
        }
        for task in tasks
    }


def model_alpha(run: Run, kind: str) -> float:
    """The interpolation weight of a model: the run's chosen alpha for `patched`, 0 for `zeroshot`."""
    return float(run.manifest["alpha"]["chosen"]) if kind == "patched" else 0.0


def metadata_props(run: Run, kind: str, precision: str, opset: int, tasks: list[str],
                   optimization: str | None) -> dict[str, str]:
    """The self-description each ONNX file carries, for consumers that get the file without export.json."""
    props = {
        "format": EXPORT_FORMAT,
        "model": kind,
        "precision": precision,
        "optimization": optimization or "none",
        "alpha": repr(model_alpha(run, kind)),
        "run": run.name,
        "run_manifest_sha256": run.manifest_sha256,
        "opset": str(opset),
        "input": INPUT_NAME,
        "outputs": json.dumps([EMBEDDING_OUTPUT, *(logits_output(task) for task in tasks)]),
        "preprocess": json.dumps(run.manifest["model"]["preprocess"]),
        "tasks": json.dumps(tasks_record(run, tasks)),
        "versions": json.dumps(versions()),
    }
    return {f"{METADATA_PREFIX}{key}": value for key, value in props.items()}


def attach_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the model's metadata_props with `props` and name patcher as its producer."""
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "patcher"
    model.producer_version = __version__
    model.doc_string = f"{props[METADATA_PREFIX + 'model']} classifier of patcher run {props[METADATA_PREFIX + 'run']}"


def read_metadata(path: Path) -> dict[str, Any]:
    """An ONNX file's patcher metadata, JSON values decoded, keys without the `patcher.` prefix."""
    model = onnx.load(str(path), load_external_data=False)
    decoded: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(METADATA_PREFIX):
            continue
        key = prop.key[len(METADATA_PREFIX) :]
        decoded[key] = json.loads(prop.value) if key in _JSON_KEYS else prop.value
    return decoded


_JSON_KEYS = {"outputs", "preprocess", "tasks", "versions"}


def model_record(path: Path, kind: str, precision: str, alpha: float, optimization: str | None) -> dict[str, Any]:
    """export.json's entry for one ONNX file."""
    return {"file": path.name, **file_record(path), "precision": precision, "model": kind, "alpha": alpha,
            "optimization": optimization or "none"}


def export_record(
    run: Run,
    tasks: list[str],
    options: dict[str, Any],
    io: dict[str, Any],
    models: dict[str, Any],
    parity: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The content of export.json (format patcher-export/1)."""
    return {
        "format": EXPORT_FORMAT,
        "run": {"name": run.name, "manifest_sha256": run.manifest_sha256, "model": run.manifest["model"]["name"]},
        "alpha": model_alpha(run, "patched"),
        "opset": options["opset"],
        "exporter": EXPORTER,
        "options": options,
        "preprocess": dict(run.manifest["model"]["preprocess"]),
        **io,
        "tasks": tasks_record(run, tasks),
        "models": models,
        "parity": parity,
        "versions": versions(),
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
        "created": now_iso(),
    }
