"""What each ONNX file says about itself (metadata_props), for consumers that get the file without export.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from patcher import __version__
from patcher.base.records import to_json
from patcher.base.versions import versions
from patcher.export.contract import EMBEDDING_OUTPUT, EXPORT_FORMAT, INPUT_NAME, ExportedTask, logits_output
from patcher.runs.manifest import Run

METADATA_PREFIX = "patcher."
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"


def metadata_props(run: Run, kind: str, precision: str, opset: int, tasks: Mapping[str, ExportedTask],
                   optimization: str | None) -> dict[str, str]:
    """The self-description each ONNX file carries, for consumers that get the file without export.json."""
    props = {
        "format": EXPORT_FORMAT,
        "model": kind,
        "precision": precision,
        "optimization": optimization or "none",
        "alpha": repr(run.manifest.alpha_of(kind)),
        "run": run.name,
        "run_manifest_sha256": run.manifest_sha256,
        "opset": str(opset),
        "input": INPUT_NAME,
        "outputs": json.dumps([EMBEDDING_OUTPUT, *(logits_output(task) for task in tasks)]),
        "preprocess": json.dumps(to_json(run.manifest.model.preprocess)),
        "tasks": json.dumps(to_json(tasks)),
        "versions": json.dumps(versions()),
    }
    return {f"{METADATA_PREFIX}{key}": value for key, value in props.items()}


def attach_metadata(model: onnx.ModelProto, props: dict[str, str], noun: str = "classifier") -> None:
    """Replace the model's metadata_props with `props` and name patcher as its producer (`noun`: what the file is,
    for its doc string)."""
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "patcher"
    model.producer_version = __version__
    described = " ".join(part for part in (props[METADATA_PREFIX + "model"], noun) if part)
    model.doc_string = f"{described} of patcher run {props[METADATA_PREFIX + 'run']}"


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
