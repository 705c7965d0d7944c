"""`model_warmup` with a real sample: Triton runs it on every new version before it reports the version READY.

The sample is the export's held-out image of the patch task (`RUN/onnx/samples/<task>.png`), given to each model in
the form its input takes: the encoded PNG (image bytes), CLIP-normalised pixels (classifiers), raw 0-255 pixels
(the pixels model); the text model gets the prompt of the sample's class (the task's first template). The files go
in the model's `warmup/` folder, where Triton looks for them. Ensembles are not warmed themselves (Triton warms
model instances; an ensemble has none): their composing models are. Inputs of other names get no warmup rather
than a wrong one: in Triton 2.51 a python-backend warmup that fails crashes the server. So does the label-set
model (`_classify`): a label set is a request's, and its first request computes the head through the text model,
which may not be loaded while `_classify` warms up.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.export.contract import INPUT_NAME
from patcher.export.openvocab import LabelSetError, check_label_set
from patcher.triton.imaging import decode_image, preprocess_image
from patcher.triton.repository.configs import IMAGE_BYTES, NUMPY_TYPES, parameter
from patcher.triton.repository.entry_context import ModelPlan
from patcher.triton.repository.export_info import ExportInfo
from patcher.triton.repository.openvocab_models import LABELS, TEMPLATE_INPUT, TEXT_INPUT
from patcher.triton.repository.pixels import PIXELS_INPUT

WARMUP_DIR = "warmup"
WARM_HEAD_FILE = "warm_head.npz"  # the task's label set and its head, in the classify model's version folder


@dataclass(frozen=True)
class Sample:
    """One real image: its task, label index, PNG bytes, the preprocessing of the export and, for an export with
    its text tower, the prompt of its class."""

    task: str
    label: int
    png: bytes
    preprocess: dict
    prompt: str | None = None


def export_sample(info: ExportInfo) -> Sample | None:
    """The patch task's sample image of the export (checked against export.json), None for an export without."""
    samples = info.record.samples
    task = info.patch_task if info.patch_task in samples else next(iter(samples), None)
    if task is None:
        return None
    record = samples[task]
    path = info.path / record.file
    if not path.is_file() or sha256_file(path) != record.sha256:
        raise PatcherError(f"{path} is missing or does not match export.json: run `patcher export` again")
    label = int(record.label)
    templates = _templates(info, task)
    classnames = _classnames(info, task)
    prompt = templates[0].replace("{}", classnames[label]) if templates and label < len(classnames) else None
    return Sample(task, label, path.read_bytes(), to_json(info.record.preprocess), prompt)


def _classnames(info: ExportInfo, task: str) -> list[str]:
    """A task's class names in export.json (none for a task it does not list)."""
    exported = info.record.tasks.get(task)
    return list(exported.classnames) if exported is not None else []


def _templates(info: ExportInfo, task: str) -> list[str]:
    """A task's prompt templates in export.json's text tower (none without one)."""
    text = info.record.text
    return list(text.templates.get(task) or []) if text is not None else []


def _serialised(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data  # one BYTES element as Triton reads it from a file: length, then bytes


def input_bytes(sample: Sample, name: str, data_type: str) -> bytes | None:
    """One batch item of input `name` as Triton's warmup reads it from a file; None for an input it cannot fill."""
    if name == IMAGE_BYTES and data_type == "TYPE_STRING":
        return _serialised(sample.png)
    if name == TEXT_INPUT and data_type == "TYPE_STRING":
        return None if sample.prompt is None else _serialised(sample.prompt.encode("utf-8"))
    if data_type not in NUMPY_TYPES or name not in (INPUT_NAME, PIXELS_INPUT):
        return None
    image = decode_image(sample.png, None, sample.preprocess)
    if name == PIXELS_INPUT:
        height, width = sample.preprocess["image_size"]
        pixels = np.asarray(image.convert("RGB").resize((width, height)), dtype=np.float32).transpose(2, 0, 1)
        return np.ascontiguousarray(pixels).astype(NUMPY_TYPES[data_type]).tobytes()
    return preprocess_image(image, sample.preprocess).astype(NUMPY_TYPES[data_type]).tobytes()


def accepted(sample: Sample, limits: dict) -> bool:
    """True when the preprocessing model's limits take the sample: a warmup request that fails crashes Triton 2.51
    (SIGSEGV in the python backend), so a refused sample must not become one."""
    try:
        decode_image(sample.png, limits, sample.preprocess)
    except ValueError:
        return False
    return True


def add_warmup(plan: ModelPlan, sample: Sample, batch_sizes: tuple[int, ...] = (1,), limits: dict | None = None
               ) -> str | None:
    """Give a backend model's config one warmup per batch size on `sample`, with its input files; None when added,
    else why not: an ensemble, an input the sample cannot fill, encoded images `limits` refuse."""
    config = plan.config
    if plan.model.is_ensemble or config.platform == "ensemble":  # kinds that route (whatever implements them)
        return "an ensemble"
    files = {}
    for tensor in config.input:
        data = input_bytes(sample, tensor.name, mc.DataType.Name(tensor.data_type))
        if data is None:
            return f"its input {tensor.name} is not one a sample image fills"
        files[tensor.name] = (tensor, data)
    if IMAGE_BYTES in files and not accepted(sample, limits or {}):
        return "the sample is outside its input limits"
    for batch_size in sorted(set(batch_sizes)):
        warmup = config.model_warmup.add(name=f"{sample.task}_sample_batch_{batch_size}", batch_size=batch_size)
        for name, (tensor, _) in files.items():
            entry = warmup.inputs[name]
            entry.data_type = tensor.data_type
            entry.dims.extend(tensor.dims)
            entry.input_data_file = name
    plan.model_files.update({f"{WARMUP_DIR}/{name}": data for name, (_, data) in files.items()})
    return None


def _elements(items: list[str]) -> bytes:
    return b"".join(_serialised(item.encode("utf-8")) for item in items)


def add_label_set_warmup(plan: ModelPlan, info: ExportInfo, sample: Sample, limits: dict | None = None) -> str | None:
    """Warm the label-set model on the sample image with its task's class names and templates, their head computed
    here and cached by the model as it starts; None when added, else why not."""
    from patcher.triton.onnxruntime_local import LocalModel  # onnxruntime: only where a classify model is written

    config = plan.config
    if int(parameter(config, "label_cache") or 0) < 1:
        return "its label cache is off (--label-cache 0)"
    classnames = _classnames(info, sample.task)
    templates = _templates(info, sample.task)
    if not accepted(sample, limits or {}):
        return "the sample is outside its input limits"
    try:
        label_set = check_label_set(classnames, templates or None, int(parameter(config, "max_labels") or 0),
                                    int(parameter(config, "max_templates") or 0))
        head = LocalModel(info.path).head(label_set)
    except (LabelSetError, PatcherError) as error:
        return f"the task's own label set does not fit it ({str(error).splitlines()[0]})"
    saved = io.BytesIO()
    np.savez(saved, head=head.astype(np.float32), labels=np.array(classnames, dtype=str),
             templates=np.array(templates, dtype=str))
    plan.files[WARM_HEAD_FILE] = lambda target, data=saved.getvalue(): target.write_bytes(data)
    inputs = {IMAGE_BYTES: ([1, 1], _serialised(sample.png)), LABELS: ([len(classnames)], _elements(classnames))}
    if templates:
        inputs[TEMPLATE_INPUT] = ([len(templates)], _elements(templates))
    warmup = config.model_warmup.add(name=f"{sample.task}_label_set", batch_size=1)
    for name, (dims, data) in inputs.items():
        entry = warmup.inputs[name]
        entry.data_type = mc.TYPE_STRING
        entry.dims.extend(dims)
        entry.input_data_file = name
        plan.model_files[f"{WARMUP_DIR}/{name}"] = data
    return None


def warm(plans: list[ModelPlan], info: ExportInfo, max_batch_size: int, gpu: bool, limits: dict | None = None
         ) -> str | None:
    """Warm every backend model of an entry on the export's sample; on a GPU (TensorRT engines are built per
    shape range) at batch 1 and at max_batch_size. Returns a note when the export has no sample."""
    sample = export_sample(info)
    if sample is None:
        return (f"{Path(info.path)} has no sample images (exported before patcher wrote them): no model_warmup; "
                "run `patcher export` again to warm new versions up")
    sizes = (1, max_batch_size) if gpu else (1,)
    refused = {}
    for plan in plans:
        if plan.model.kind == "classify":
            reason = add_label_set_warmup(plan, info, sample, limits)
        else:
            reason = add_warmup(plan, sample, sizes, limits)
        if reason is not None and not plan.model.is_ensemble and plan.config.platform != "ensemble":
            refused[plan.model.name] = reason
    return "; ".join(f"no warmup for {name} ({reason})" for name, reason in refused.items()) or None
