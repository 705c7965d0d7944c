"""Read an export directory (`RUN/onnx/export.json` and its ONNX files) for the repository writer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.export.contract import EXPORT_JSON, read_export_record, tensor_name
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
    """A checked export directory: export.json's content and its sha256."""

    path: Path
    data: dict[str, Any]
    sha256: str

    @property
    def preprocess(self) -> dict[str, Any]:
        """The client-side preprocessing the graphs expect (export.json "preprocess")."""
        return dict(self.data["preprocess"])

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """Tasks by name, each with role, classnames and output tensor name."""
        return dict(self.data["tasks"])

    @property
    def patch_task(self) -> str:
        """The first task with role "patch" (the default model name), else the first task."""
        patch = [task for task, info in self.tasks.items() if info.get("role") == "patch"]
        return (patch or list(self.tasks))[0]

    def default_name(self) -> str:
        """The model name a repository uses when none is given: the patch task, made tensor-name safe."""
        return tensor_name(self.patch_task)

    @property
    def content_sha256(self) -> str:
        """Identity of what gets served (model file hashes, tensors, preprocessing, tasks), not export.json's bytes.

        Re-exporting an unchanged run writes a new export.json (timestamps) but the same content digest.
        """
        models = {
            key: record.get("sha256") or sha256_file(self.path / record["file"])
            for key, record in self.data["models"].items()
        }
        identity = {key: self.data.get(key) for key in ("input", "outputs", "preprocess", "tasks")}
        if self.text is not None:  # exports without a text tower keep the digest they always had
            identity["text"] = {"tokenizer": self.text["tokenizer"], "templates": self.text["templates"],
                                "models": {kind: m["sha256"] for kind, m in self.text["models"].items()}}
        text = json.dumps({**identity, "models": models}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def model_file(self, kind: str, precision: str = "fp32") -> Path:
        """The ONNX file of `kind` ("patched" or "zeroshot") at `precision`, after checking its sha256."""
        models = self.data.get("models", {})
        candidates = [m for key, m in models.items() if key == kind or key.startswith(f"{kind}_")]
        record = next((m for m in candidates if m.get("precision", "fp32") == precision), None)
        if record is None:
            raise PatcherError(
                f"{self.path / EXPORT_JSON} has no {precision} {kind} model: "
                f"export it first (`patcher export` with {precision}) or pass --precision fp32"
            )
        path = self.path / record["file"]
        if not path.is_file():
            raise PatcherError(f"{path} is missing: the export is incomplete, run `patcher export` again")
        if "sha256" in record and sha256_file(path) != record["sha256"]:
            raise PatcherError(f"{path} does not match the sha256 in {EXPORT_JSON}: re-run `patcher export`")
        return path


    @property
    def text(self) -> dict[str, Any] | None:
        """export.json's text tower (tensors, tokenizer, models, templates), None for an export without one."""
        return self.data.get("text")

    def text_file(self, kind: str = "patched") -> Path:
        """The text tower of `kind`, after checking its sha256."""
        if self.text is None or kind not in self.text["models"]:
            raise PatcherError(f"{self.path / EXPORT_JSON} has no {kind} text tower: run `patcher export` again")
        return self._checked(self.text["models"][kind]["file"], self.text["models"][kind]["sha256"])

    def vocabulary_file(self) -> Path:
        """The tokenizer's vocabulary file, after checking its sha256."""
        if self.text is None:
            raise PatcherError(f"{self.path / EXPORT_JSON} has no text tower: run `patcher export` again")
        tokenizer = self.text["tokenizer"]
        return self._checked(tokenizer["vocabulary"], tokenizer["vocabulary_sha256"])

    def _checked(self, file: str, sha256: str) -> Path:
        path = self.path / file
        if not path.is_file():
            raise PatcherError(f"{path} is missing: the export is incomplete, run `patcher export` again")
        if sha256_file(path) != sha256:
            raise PatcherError(f"{path} does not match the sha256 in {EXPORT_JSON}: re-run `patcher export`")
        return path


def load_export(path: Path | str) -> ExportInfo:
    """Read an export directory (or a run directory holding `onnx/`); PatcherError if it is not one."""
    path = Path(path)
    if not (path / EXPORT_JSON).is_file() and (path / "onnx" / EXPORT_JSON).is_file():
        path = path / "onnx"
    export_json = path / EXPORT_JSON
    if not export_json.is_file():
        raise PatcherError(f"{path} has no {EXPORT_JSON}: pass the onnx/ folder written by `patcher export RUN`")
    data = to_json(read_export_record(export_json))
    _check_run(path, data)
    return ExportInfo(path=path, data=data, sha256=sha256_file(export_json))


def _check_run(path: Path, data: dict[str, Any]) -> None:
    """An export inside a run directory must be that run's: export.json's manifest hash is the run's manifest's."""
    run = path.absolute().parent
    manifest = run / MANIFEST
    if not manifest.is_file():
        return  # an export folder of its own: nothing to bind it to
    recorded = data.get("run", {}).get("manifest_sha256")
    actual = sha256_file(manifest)
    if recorded != actual:
        source = data.get("run", {}).get("name", "another run")
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
