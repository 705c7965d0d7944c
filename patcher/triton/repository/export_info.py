"""An export directory for the repository writer: export.json's typed record, its sha256, its checked files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.export.contract import (
    EXPORT_JSON,
    ExportRecord,
    read_export_record,
    tensor_name,
    verified_model_file,
    verified_text_file,
    verified_vocabulary,
)
from patcher.runs.layout import MANIFEST

# ONNX TensorProto element types -> Triton config data types.
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, Triton data type, full shape (-1 for dynamic dims)."""

    name: str
    data_type: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExportInfo:
    """A checked export directory: its typed record (export.json) and that file's sha256."""

    path: Path
    record: ExportRecord
    sha256: str

    @property
    def patch_task(self) -> str:
        """The first task with role "patch" (the default model name), else the first task."""
        return self.record.patch_task

    def default_name(self) -> str:
        """The model name a repository uses when none is given: the patch task, made tensor-name safe."""
        return tensor_name(self.patch_task)

    @property
    def content_sha256(self) -> str:
        """Identity of what gets served (model file hashes, tensors, preprocessing, tasks), not export.json's bytes.

        Re-exporting an unchanged run writes a new export.json (timestamps) but the same content digest.
        """
        record = self.record
        models = {key: model.sha256 or sha256_file(self.path / model.file) for key, model in record.models.items()}
        identity: dict[str, Any] = {"input": to_json(record.input), "outputs": to_json(record.outputs),
                                    "preprocess": to_json(record.preprocess), "tasks": to_json(record.tasks)}
        if record.text is not None:  # exports without a text tower keep the digest they always had
            identity["text"] = {"tokenizer": to_json(record.text.tokenizer),
                                "templates": to_json(record.text.templates),
                                "models": {kind: m.sha256 for kind, m in record.text.models.items()}}
        text = json.dumps({**identity, "models": models}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def model_file(self, kind: str, precision: str = "fp32") -> Path:
        """The ONNX file of `kind` ("patched" or "zeroshot") at `precision`, after checking its sha256."""
        return verified_model_file(self.path, self.record, kind, precision)

    def text_file(self, kind: str = "patched") -> Path:
        """The text tower of `kind`, after checking its sha256."""
        return verified_text_file(self.path, self.record, kind)

    def vocabulary_file(self) -> Path:
        """The tokenizer's vocabulary file, after checking its sha256."""
        return verified_vocabulary(self.path, self.record)


def load_export(path: Path | str) -> ExportInfo:
    """Read an export directory (or a run directory holding `onnx/`); PatcherError if it is not one."""
    path = Path(path)
    if not (path / EXPORT_JSON).is_file() and (path / "onnx" / EXPORT_JSON).is_file():
        path = path / "onnx"
    export_json = path / EXPORT_JSON
    if not export_json.is_file():
        raise PatcherError(f"{path} has no {EXPORT_JSON}: pass the onnx/ folder written by `patcher export RUN`")
    record = read_export_record(export_json)
    _check_run(path, record)
    return ExportInfo(path=path, record=record, sha256=sha256_file(export_json))


def _check_run(path: Path, record: ExportRecord) -> None:
    """An export inside a run directory must be that run's: export.json's manifest hash is the run's manifest's."""
    run = path.absolute().parent
    manifest = run / MANIFEST
    if not manifest.is_file():
        return  # an export folder of its own: nothing to bind it to
    recorded = record.run.manifest_sha256
    actual = sha256_file(manifest)
    if recorded != actual:
        source = record.run.name
        raise PatcherError(f"{path / EXPORT_JSON} was exported from {source!r} (manifest sha256 {str(recorded)[:12]}), "
                           f"not from the run it sits in, {run} (manifest sha256 {actual[:12]}): "
                           f"export this run with `patcher export {run} --overwrite`")


def onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph inputs and outputs of an ONNX file (initializers excluded), with Triton data types."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        data_type = ONNX_TO_TRITON.get(tensor_type.elem_type)
        if data_type is None:
            raise PatcherError(f"{path}: tensor {value.name} has ONNX type {tensor_type.elem_type}, unsupported")
        return TensorSpec(value.name, data_type, dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs
