"""Check an exported model before it is kept: ONNX checker, dynamic batch, a clean load, and parity with PyTorch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from patcher.base.errors import PatcherError
from patcher.export.contract import INPUT_NAME, logits_output
from patcher.export.graph import ExportGraph
from patcher.export.heldout import HeldOut
from patcher.export.parity import RULES, failures, rule_for, task_parity
from patcher.export.providers import open_session

BATCH_SIZES = (1, 7, 64)
LOAD_TIMEOUT_S = 300

_LOAD_SCRIPT = "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"


def thresholds(accuracy_tolerance: float | None = None) -> dict[str, Any]:
    """The pass marks of every precision, as export.json records them."""
    return {precision: rule_for(precision, accuracy_tolerance).record() for precision in RULES}


def checked_graph(path: Path) -> tuple[onnx.GraphProto, list[onnx.ValueInfoProto]]:
    """The graph of an ONNX file that passes onnx.checker, and its inputs (initializers left out); PatcherError
    naming the checker's complaint otherwise."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise PatcherError(f"{path.name} fails onnx.checker: {str(error).splitlines()[0]}") from error
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return graph, [value for value in graph.input if value.name not in initializers]


def check_structure(path: Path, output_names: list[str], widths: dict[str, int]) -> None:
    """onnx.checker, then the contract: one float32 `image` input, the expected outputs, a symbolic batch axis."""
    graph, inputs = checked_graph(path)
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


def run_session(path: Path, images: np.ndarray, device: str = "cpu") -> list[np.ndarray]:
    """Every output of one onnxruntime session on `device` (CUDA: exact float32, no TF32) over all images, fed in
    the batch sizes of `batch_plan`."""
    session = open_session(path, device, tf32=False)
    parts = []
    for rows in batch_plan(len(images)):
        try:
            parts.append(session.run(None, {INPUT_NAME: images[rows]}))
        except Exception as error:  # onnxruntime raises its own types; a frozen batch dimension fails here
            first = str(error).splitlines()[0][:200]
            raise PatcherError(f"{path.name} fails at batch size {rows.stop - rows.start} in onnxruntime "
                               f"({first}): the export is broken") from None
    return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]


@dataclass(frozen=True, kw_only=True)
class TorchReference:
    """PyTorch's outputs on the held-out images, with the graph's output names and each task head's logit scale."""

    outputs: list[torch.Tensor]
    names: list[str]
    scales: dict[str, float]

    @classmethod
    def of(cls, graph: ExportGraph, outputs: list[torch.Tensor]) -> TorchReference:
        """The reference `graph` gave."""
        return cls(outputs=outputs, names=graph.output_names, scales=graph.logit_scales())


def parity_report(path: Path, precision: str, heldout: HeldOut, reference: TorchReference,
                  accuracy_tolerance: float | None = None, device: str = "cpu") -> dict[str, Any]:
    """onnxruntime against PyTorch on the held-out images: max |diff| per output, and per task the figures the
    parity rule judges (`patcher.export.parity`); `accuracy_tolerance` the user's (points) in place of the rule's;
    `device` where onnxruntime runs (its reference from the same device)."""
    output_names, scales = reference.names, reference.scales
    count = len(heldout.images)
    needed = sum(BATCH_SIZES)
    # Too few images for one batch of each size: repeat them; the statistics use the first `count` rows.
    rows = np.resize(np.arange(count), max(count, needed))
    images = heldout.images.numpy()
    outputs = run_session(path, images if count >= needed else images[rows], device)
    expected = [tensor.float().cpu().numpy() for tensor in reference.outputs]
    max_abs_diff = {
        name: float(np.abs(got - want[rows]).max()) for name, got, want in zip(output_names, outputs, expected,
                                                                               strict=True)
    }
    by_name = dict(zip(output_names, outputs, strict=True))
    reference_by_name = dict(zip(output_names, expected, strict=True))
    labels = heldout.labels.numpy()
    rule = rule_for(precision, accuracy_tolerance)
    tasks = {
        task: task_parity(reference_by_name[logits_output(task)][span], by_name[logits_output(task)][:count][span],
                          labels[span], scales[task], rule)
        for task, span in heldout.spans.items()
    }
    problems = failures(tasks, max_abs_diff, rule)
    return {
        "precision": precision,
        "images": count,
        "images_per_task": heldout.counts(),
        "batch_sizes": sorted({rows_.stop - rows_.start for rows_ in batch_plan(len(rows))}),
        "max_abs_diff": max_abs_diff,
        "top1_agreement": {task: report["top1_agreement"] for task, report in tasks.items()},
        "tasks": tasks,
        "rule": rule.record(),
        "problems": problems,
        "passed": not problems,
    }


def verify_model(path: Path, precision: str, graph: ExportGraph, heldout: HeldOut,
                 reference: list[torch.Tensor], accuracy_tolerance: float | None = None) -> dict[str, Any]:
    """Structure, a clean load and the parity rule (with the user's accuracy tolerance, if given) for one exported
    file; its report, or PatcherError."""
    check_structure(path, graph.output_names, graph.output_widths())
    check_loads(path)
    report = parity_report(path, precision, heldout, TorchReference.of(graph, reference), accuracy_tolerance)
    if not report["passed"]:
        raise PatcherError(f"{path.name} fails the parity check on {report['images']} held-out images: "
                           f"{'; '.join(report['problems'])}; nothing was written")
    return report
