"""What one entry's models consist of: each model's config.pbtxt, labels files and version files, from an export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.export.contract import logits_output
from patcher.triton.configs import (
    ENTRY_PARAMETER,
    IMAGE_BYTES,
    Batching,
    Step,
    classifier_config,
    ensemble_config,
    preprocess_config,
)
from patcher.triton.entry import Entry, Model
from patcher.triton.export_info import ExportInfo, TensorSpec, onnx_io
from patcher.triton.pixels import PIXELS_INPUT, pixels_graph

TEMPLATES = Path(__file__).parent / "templates"
TRITON_DTYPE_TO_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP16": "float16"}
IMAGE_FORMAT = "FORMAT_NCHW"
# A version file: a file to copy, a text to write, or a function that writes the file at the path it is given.
Source = Path | str | Callable[[Path], Any]


@dataclass
class ModelPlan:
    """One model to write: its configuration, labels files (name -> class names) and version files."""

    model: Model
    config: mc.ModelConfig
    labels: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, Source] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """How the entry is served: backend flavour, batching, precision, preprocessing limits."""

    backend: str = "python"
    batching: Batching = field(default_factory=Batching)
    tensorrt_fp16: bool = False
    precision: str = "fp32"
    limits: dict[str, Any] = field(default_factory=dict)


def _fill_dims(spec: TensorSpec, declared: dict[str, list[int]]) -> TensorSpec:
    """Unknown non-batch ONNX dims (-1) taken from export.json's shapes where it states them."""
    shape = declared.get(spec.name)
    if not shape or len(shape) != len(spec.shape):
        return spec
    dims = tuple(d if d != -1 else int(shape[i]) for i, d in enumerate(spec.shape))
    return TensorSpec(spec.name, spec.data_type, (spec.shape[0], *dims[1:]))


def classifier_io(info: ExportInfo, path: Path) -> tuple[TensorSpec, list[TensorSpec]]:
    """The image input and the outputs of an exported classifier, checked against export.json."""
    declared = {t["name"]: t["shape"] for t in [info.data.get("input", {}), *info.data.get("outputs", [])] if t}
    for task, record in info.tasks.items():
        declared.setdefault(record.get("output", logits_output(task)), [-1, len(record["classnames"])])
    inputs, outputs = onnx_io(path)
    inputs = [_fill_dims(s, declared) for s in inputs]
    outputs = [_fill_dims(s, declared) for s in outputs]
    if len(inputs) != 1:
        raise PatcherError(f"{path} has {len(inputs)} inputs, expected one image input: re-run `patcher export`")
    frozen = [s.name for s in [*inputs, *outputs] if not s.shape or s.shape[0] != -1]
    if frozen:
        raise PatcherError(f"{path}: batch dimension of {', '.join(frozen)} is fixed, not dynamic: re-export it")
    missing = set(_task_outputs(info).values()) - {s.name for s in outputs}
    if missing:
        raise PatcherError(f"{path} lacks outputs {sorted(missing)} that {info.path / 'export.json'} lists")
    if inputs[0].data_type not in TRITON_DTYPE_TO_NUMPY:
        raise PatcherError(f"{path}: image input is {inputs[0].data_type}, expected float32 or float16")
    return inputs[0], outputs


def _task_outputs(info: ExportInfo) -> dict[str, str]:
    """task -> logits output name."""
    return {task: record.get("output", logits_output(task)) for task, record in info.tasks.items()}


def plan_entry(
    info: ExportInfo, entry: Entry, files: dict[str, Path], options: Options, record: str
) -> list[ModelPlan]:
    """Every model of the entry with its configuration and files; `record` is the version record (patcher.json)."""
    image, outputs = classifier_io(info, files["patched"])
    if classifier_io(info, files["zeroshot"]) != (image, outputs):
        raise PatcherError(f"{files['zeroshot']} and {files['patched']} have different inputs or outputs")
    task_outputs = _task_outputs(info)
    labels = {output: f"{output}_labels.txt" for output in task_outputs.values()}
    label_text = {labels[output]: list(info.tasks[task]["classnames"]) for task, output in task_outputs.items()}
    preprocess = {**info.preprocess, "dtype": TRITON_DTYPE_TO_NUMPY[image.data_type]}
    pixels = TensorSpec(PIXELS_INPUT, image.data_type, image.shape)
    image_bytes = TensorSpec(IMAGE_BYTES, "TYPE_STRING", (-1, 1))
    batching, backend = options.batching, options.backend
    names = {m.kind: m.name for m in entry.models() if m.task is None}
    common = {ENTRY_PARAMETER: entry.name, "run": info.data.get("run", {}).get("name", "")}
    described = {**common, "tasks": task_outputs, "preprocess_model": names["preprocess"]}
    by_output = {spec.name: spec for spec in outputs}
    onnx_model = (TEMPLATES / "onnx_model.py").read_text()
    plans = []
    for model in entry.models():
        version: dict[str, Source] = {"patcher.json": record}
        if model.kind == "preprocess":
            config = preprocess_config(model.name, image, batching,
                                       {**common, "preprocess": preprocess, "limits": options.limits})
            version["model.py"] = (TEMPLATES / "preprocess_model.py").read_text()
            plans.append(ModelPlan(model, config, {}, version))
            continue
        if model.kind in ("patched", "zeroshot", "pixels"):
            source = files["patched" if model.kind == "pixels" else model.kind]
            spec, image_format = (pixels, IMAGE_FORMAT) if model.kind == "pixels" else (image, None)
            config = classifier_config(model.name, spec, outputs, backend, batching, labels, described,
                                       options.tensorrt_fp16, image_format)
            if model.kind == "pixels":
                mean, std = preprocess["mean"], preprocess["std"]
                version["model.onnx"] = lambda target, s=source, m=mean, d=std: pixels_graph(s, target, m, d)
            else:
                version["model.onnx"] = source  # for platform onnxruntime_onnx and for model.py alike
            version["model.py"] = onnx_model  # for backend python; ignored by onnxruntime_onnx
        elif model.kind == "ensemble":
            steps = [Step(names["preprocess"], {IMAGE_BYTES: IMAGE_BYTES}, {image.name: image.name}),
                     Step(names["patched"], {image.name: image.name}, {o.name: o.name for o in outputs})]
            config = ensemble_config(model.name, image_bytes, steps, outputs, batching.max_batch_size, labels,
                                     described)
        else:
            output = task_outputs[model.task or ""]
            single = {"tasks": {model.task: output}}
            if model.kind == "task_pixels":
                steps = [Step(names["pixels"], {PIXELS_INPUT: PIXELS_INPUT}, {output: output})]
                config = ensemble_config(model.name, pixels, steps, [by_output[output]], batching.max_batch_size,
                                         labels, {**common, **single}, IMAGE_FORMAT)
            else:
                steps = [Step(names["preprocess"], {IMAGE_BYTES: IMAGE_BYTES}, {image.name: image.name}),
                         Step(names["patched"], {image.name: image.name}, {output: output})]
                config = ensemble_config(model.name, image_bytes, steps, [by_output[output]],
                                         batching.max_batch_size, labels,
                                         {**common, **single, "preprocess_model": names["preprocess"]})
        used = {o.label_filename for o in config.output if o.label_filename}
        plans.append(ModelPlan(model, config, {f: t for f, t in label_text.items() if f in used}, version))
    return plans
