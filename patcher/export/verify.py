"""Check an exported model before it is kept: ONNX checker, dynamic batch, a clean load, and parity with PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from patcher.errors import PatcherError
from patcher.export.graph import INPUT_NAME
from patcher.export.heldout import HeldOut
from patcher.export.naming import logits_output

BATCH_SIZES = (1, 7, 64)
FP32_MAX_ABS_DIFF = 1e-3
FP32_MIN_AGREEMENT = 100.0
FP16_MIN_AGREEMENT = 99.5
LOAD_TIMEOUT_S = 300

_LOAD_SCRIPT = "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"


def thresholds() -> dict[str, float]:
    """The pass marks, as export.json records them."""
    return {"fp32_max_abs_diff": FP32_MAX_ABS_DIFF, "fp32_min_top1_agreement": FP32_MIN_AGREEMENT,
            "fp16_min_top1_agreement": FP16_MIN_AGREEMENT}


def check_structure(path: Path, output_names: list[str], widths: dict[str, int]) -> None:
    """onnx.checker, then the contract: one float32 `image` input, the expected outputs, a symbolic batch axis."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise PatcherError(f"{path.name} fails onnx.checker: {str(error).splitlines()[0]}") from error
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if [value.name for value in inputs] != [INPUT_NAME]:
        raise PatcherError(f"{path.name} has inputs {[v.name for v in inputs]}, expected [{INPUT_NAME!r}]")
    if [value.name for value in graph.output] != output_names:
        raise PatcherError(f"{path.name} has outputs {[v.name for v in graph.output]}, expected {output_names}")
    for value in [*inputs, *graph.output]:
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            raise PatcherError(f"{path.name}: {value.name} is {onnx.TensorProto.DataType.Name(tensor.elem_type)}, "
                               "expected FLOAT")
        batch = tensor.shape.dim[0]
        if batch.HasField("dim_value") or not batch.dim_param:
            raise PatcherError(f"{path.name}: the batch axis of {value.name} is fixed, not dynamic")
        if value.name in widths and tensor.shape.dim[1].dim_value != widths[value.name]:
            raise PatcherError(f"{path.name}: {value.name} has width {tensor.shape.dim[1].dim_value}, "
                               f"expected {widths[value.name]}")


def check_loads(path: Path) -> None:
    """Open the model in a fresh process with onnxruntime's default options, so a crash there cannot end this one."""
    try:
        result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, text=True,
                                timeout=LOAD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise PatcherError(f"onnxruntime took over {LOAD_TIMEOUT_S} s to load {path.name}") from error
    if result.returncode < 0:
        raise PatcherError(f"onnxruntime crashed (signal {-result.returncode}) loading {path.name} with default "
                           "options: this model would crash a server too")
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no error output"]
        raise PatcherError(f"onnxruntime cannot load {path.name}: {lines[-1]}")


def batch_plan(total: int) -> list[slice]:
    """Slices over `total` rows: one batch of each size in BATCH_SIZES first, then batches of the largest size."""
    largest = max(BATCH_SIZES)
    slices, start = [], 0
    for size in BATCH_SIZES:
        slices.append(slice(start, start + size))
        start += size
    while start < total:
        slices.append(slice(start, min(start + largest, total)))
        start += largest
    return slices


def run_session(path: Path, images: np.ndarray) -> list[np.ndarray]:
    """Every output of one onnxruntime session over all images, fed in the batch sizes of `batch_plan`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {INPUT_NAME: images[rows]}) for rows in batch_plan(len(images))]
    return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]


def parity_report(
    path: Path,
    precision: str,
    heldout: HeldOut,
    reference: list[torch.Tensor],
    output_names: list[str],
) -> dict[str, Any]:
    """onnxruntime against PyTorch on the held-out images: max |diff| per output, top-1 agreement per task."""
    count = len(heldout.images)
    needed = sum(BATCH_SIZES)
    # Too few images for one batch of each size: repeat them; the statistics use the first `count` rows.
    rows = np.resize(np.arange(count), max(count, needed))
    images = heldout.images.numpy()
    outputs = run_session(path, images if count >= needed else images[rows])
    expected = [tensor.numpy() for tensor in reference]
    max_abs_diff = {
        name: float(np.abs(got - want[rows]).max()) for name, got, want in zip(output_names, outputs, expected,
                                                                               strict=True)
    }
    by_name = dict(zip(output_names, outputs, strict=True))
    reference_by_name = dict(zip(output_names, expected, strict=True))
    labels = heldout.labels.numpy()
    agreement, accuracy, reference_accuracy = {}, {}, {}
    for task, span in heldout.spans.items():
        got = by_name[logits_output(task)][:count][span].argmax(axis=1)
        want = reference_by_name[logits_output(task)][span].argmax(axis=1)
        agreement[task] = round(float((got == want).mean() * 100), 3)
        accuracy[task] = round(float((got == labels[span]).mean() * 100), 3)
        reference_accuracy[task] = round(float((want == labels[span]).mean() * 100), 3)
    return {
        "precision": precision,
        "images": count,
        "images_per_task": heldout.counts(),
        "batch_sizes": sorted({rows_.stop - rows_.start for rows_ in batch_plan(len(rows))}),
        "max_abs_diff": max_abs_diff,
        "top1_agreement": agreement,
        "accuracy": accuracy,
        "torch_accuracy": reference_accuracy,
    }


def failures(report: dict[str, Any]) -> list[str]:
    """What in a parity report misses its pass mark, as short phrases with the numbers; empty when it passes."""
    problems = []
    if report["precision"] == "fp32":
        for name, diff in report["max_abs_diff"].items():
            if not diff <= FP32_MAX_ABS_DIFF:
                problems.append(f"max |{name} diff| {diff:.2e} > {FP32_MAX_ABS_DIFF:g}")
        minimum = FP32_MIN_AGREEMENT
    else:
        minimum = FP16_MIN_AGREEMENT
    for task, agreement in report["top1_agreement"].items():
        if agreement < minimum:
            problems.append(f"{task} top-1 agreement {agreement:.2f}% < {minimum:g}%")
    return problems
