"""Write a Triton model repository from an export: classifiers, preprocessing, ensemble; numbered versions."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from patcher.errors import PatcherError
from patcher.export.naming import tensor_name
from patcher.runs.manifest import now_iso
from patcher.triton.configs import (
    Batching,
    classifier_config,
    ensemble_config,
    preprocess_config,
    write_config,
)
from patcher.triton.export_info import ExportInfo, TensorSpec, load_export, onnx_io

TEMPLATES = Path(__file__).parent / "templates"
VERSION_RECORD = "patcher.json"
PRECISIONS = ("fp32", "fp16")
CLASSIFIERS = ("patched", "zeroshot")
TRITON_DTYPE_TO_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP16": "float16"}


def model_names(name: str) -> dict[str, str]:
    """Triton model names for one repository entry: ensemble, preprocess, patched, zeroshot."""
    return {
        "ensemble": name,
        "preprocess": f"{name}_preprocess",
        "patched": f"{name}_patched",
        "zeroshot": f"{name}_zeroshot",
    }


def model_versions(model_dir: Path) -> list[int]:
    """The numbered version directories of one model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _version_key(model_dir: Path, version: int) -> tuple[str, str] | None:
    record = model_dir / str(version) / VERSION_RECORD
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data.get("content_sha256"), data.get("precision")


def _existing_version(repo: Path, names: dict[str, str], key: tuple[str, str]) -> int | None:
    """The version that already holds this export in every model of the entry, if one does."""
    common: set[int] | None = None
    for model in names.values():
        model_dir = repo / model
        holding = {v for v in model_versions(model_dir) if _version_key(model_dir, v) == key}
        common = holding if common is None else common & holding
    return max(common) if common else None


def _write_labels(model_dir: Path, labels: dict[str, list[str]]) -> None:
    for filename, classnames in labels.items():
        path = model_dir / filename
        temporary = path.with_name(f".{filename}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_text("".join(" ".join(str(c).split()) + "\n" for c in classnames))
        os.replace(temporary, path)


def _publish_version(model_dir: Path, version: int, fill: dict[str, Any]) -> None:
    """Build `model_dir/<version>` in a staging directory beside it, then rename it into place."""
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / str(version)
    if final.exists():
        raise PatcherError(f"{final} already exists: another `patcher triton` is writing this repository")
    staging = model_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name, source in fill.items():
            target = staging / name
            if isinstance(source, Path):
                shutil.copyfile(source, target)
            else:
                target.write_text(source)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fill_dims(spec: TensorSpec, declared: dict[str, list[int]]) -> TensorSpec:
    """Unknown non-batch ONNX dims (-1) taken from export.json's shapes where it states them."""
    shape = declared.get(spec.name)
    if not shape or len(shape) != len(spec.shape):
        return spec
    dims = tuple(d if d != -1 else int(shape[i]) for i, d in enumerate(spec.shape))
    return TensorSpec(spec.name, spec.data_type, (spec.shape[0], *dims[1:]))


def _classifier_io(info: ExportInfo, path: Path) -> tuple[TensorSpec, list[TensorSpec]]:
    declared = {t["name"]: t["shape"] for t in [info.data.get("input", {}), *info.data.get("outputs", [])] if t}
    for task in info.tasks.values():
        declared.setdefault(task.get("output", ""), [-1, len(task["classnames"])])
    inputs, outputs = onnx_io(path)
    inputs = [_fill_dims(s, declared) for s in inputs]
    outputs = [_fill_dims(s, declared) for s in outputs]
    if len(inputs) != 1:
        raise PatcherError(f"{path} has {len(inputs)} inputs, expected one image input: re-run `patcher export`")
    frozen = [s.name for s in [*inputs, *outputs] if not s.shape or s.shape[0] != -1]
    if frozen:
        raise PatcherError(f"{path}: batch dimension of {', '.join(frozen)} is fixed, not dynamic: re-export it")
    expected = {info.tasks[task].get("output", f"logits_{tensor_name(task)}") for task in info.tasks}
    missing = expected - {s.name for s in outputs}
    if missing:
        raise PatcherError(f"{path} lacks outputs {sorted(missing)} that {info.path / 'export.json'} lists")
    return inputs[0], outputs


def _configs(
    info: ExportInfo,
    names: dict[str, str],
    image: TensorSpec,
    outputs: list[TensorSpec],
    preprocess: dict[str, Any],
    backend: str,
    batching: Batching,
    tensorrt_fp16: bool,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The four model configurations, and the labels files (name -> class names) of the logits outputs."""
    output_tasks = {info.tasks[t].get("output", f"logits_{tensor_name(t)}"): t for t in info.tasks}
    labels = {output: f"{output}_labels.txt" for output in output_tasks}
    label_text = {labels[o]: list(info.tasks[t]["classnames"]) for o, t in output_tasks.items()}
    parameters = {
        "preprocess": preprocess,
        "tasks": {task: output for output, task in output_tasks.items()},
        "run": info.data.get("run", {}).get("name", ""),
    }
    configs = {
        kind: classifier_config(names[kind], [image], outputs, backend, batching, labels, parameters, tensorrt_fp16)
        for kind in CLASSIFIERS
    }
    configs["preprocess"] = preprocess_config(names["preprocess"], image, batching, {"preprocess": preprocess})
    configs["ensemble"] = ensemble_config(
        names["ensemble"],
        names["preprocess"],
        names["patched"],
        image,
        outputs,
        batching.max_batch_size,
        labels,
        parameters,
    )
    return configs, label_text


def _version_files(files: dict[str, Path], preprocess: dict[str, Any], record: str) -> dict[str, dict[str, Any]]:
    """What each model's version directory holds: file name -> source Path (copied) or text (written)."""
    fills: dict[str, dict[str, Any]] = {
        kind: {
            "model.onnx": files[kind],  # for platform onnxruntime_onnx
            "model.py": (TEMPLATES / "onnx_model.py").read_text(),  # for backend python; ignored otherwise
            VERSION_RECORD: record,
        }
        for kind in CLASSIFIERS
    }
    fills["preprocess"] = {
        "model.py": (TEMPLATES / "preprocess_model.py").read_text(),
        "preprocess.json": json.dumps(preprocess, indent=2),
        VERSION_RECORD: record,
    }
    fills["ensemble"] = {VERSION_RECORD: record}
    return fills


def write_repository(
    export_dir: Path,
    repo: Path,
    name: str | None = None,
    backend: str = "python",
    max_batch_size: int = 64,
    instances: int = 1,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 0,
    tensorrt_fp16: bool = False,
    precision: str = "fp32",
) -> dict:
    """Add an export to a model repository as a new version of `<name>`, `_preprocess`, `_patched`, `_zeroshot`.

    Returns what was written; an export already in the repository gets no new version (configs are refreshed).
    """
    if precision not in PRECISIONS:
        raise PatcherError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if tensorrt_fp16 and backend != "onnxruntime":
        raise PatcherError("TensorRT FP16 needs --backend onnxruntime (NVIDIA's container on a GPU host)")
    if max_batch_size < 1 or instances < 1 or max_queue_delay_us < 0:
        raise PatcherError("max_batch_size and instances must be at least 1, max_queue_delay_us at least 0")
    preferred = sorted(set(preferred_batch_sizes or []))
    if any(size < 1 or size > max_batch_size for size in preferred):
        raise PatcherError(f"preferred batch sizes {preferred} must lie in 1..{max_batch_size} (max_batch_size)")

    info = load_export(export_dir)
    name = tensor_name(name) if name else info.default_name()
    names = model_names(name)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    files = {kind: info.model_file(kind, precision) for kind in CLASSIFIERS}
    image, outputs = _classifier_io(info, files["patched"])
    zeroshot_image, zeroshot_outputs = _classifier_io(info, files["zeroshot"])
    if (zeroshot_image, zeroshot_outputs) != (image, outputs):
        raise PatcherError(f"{files['zeroshot']} and {files['patched']} have different inputs or outputs")

    if image.data_type not in TRITON_DTYPE_TO_NUMPY:
        raise PatcherError(f"{files['patched']}: image input is {image.data_type}, expected float32 or float16")
    preprocess = {**info.preprocess, "dtype": TRITON_DTYPE_TO_NUMPY[image.data_type]}
    batching = Batching(max_batch_size, instances, preferred, max_queue_delay_us)
    configs, label_text = _configs(info, names, image, outputs, preprocess, backend, batching, tensorrt_fp16)

    key = (info.content_sha256, precision)
    existing = _existing_version(repo, names, key)
    if existing is not None:
        version, new = existing, False
        message = f"this export ({key[0][:12]}) is already version {version} of {name}: no new version written"
    else:
        version = 1 + max([0, *(v for model in names.values() for v in model_versions(repo / model))])
        new = True
        message = f"wrote version {version} of {name} ({', '.join(names.values())})"
        record = json.dumps(
            {
                "content_sha256": key[0],
                "export_json_sha256": info.sha256,
                "precision": precision,
                "run": info.data.get("run", {}),
                "alpha": info.data.get("alpha"),
                "source": str(info.path.resolve()),
                "created": now_iso(),
            },
            indent=2,
        )
        fills = _version_files(files, preprocess, record)
        # Composing models first, the ensemble last: nothing refers to a version that is not complete.
        for kind in ("preprocess", "patched", "zeroshot", "ensemble"):
            _publish_version(repo / names[kind], version, fills[kind])

    for kind in ("preprocess", "patched", "zeroshot", "ensemble"):
        model_dir = repo / names[kind]
        if kind != "preprocess":
            _write_labels(model_dir, label_text)
        write_config(configs[kind], model_dir)

    return {
        "repository": str(repo),
        "name": name,
        "backend": backend,
        "precision": precision,
        "version": version,
        "new_version": new,
        "message": message,
        "content_sha256": key[0],
        "models": {
            names[kind]: {"kind": kind, "version": version, "versions": model_versions(repo / names[kind])}
            for kind in ("ensemble", "preprocess", "patched", "zeroshot")
        },
    }
