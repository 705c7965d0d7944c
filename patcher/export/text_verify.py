"""Check an exported text tower before it is kept: its structure, a clean load, its embeddings against PyTorch's on
the run's own prompts (several batch sizes), and the heads it makes against the heads the build stored, judged on
held-out images by the image graphs' parity rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from patcher.base.errors import PatcherError
from patcher.export.contract import TEXT_INPUT, TEXT_OUTPUT
from patcher.export.heldout import HeldOut
from patcher.export.openvocab import class_heads
from patcher.export.parity import failures, rule_for, task_parity
from patcher.export.text import TextGraph
from patcher.export.verify import BATCH_SIZES, batch_plan, check_loads, checked_graph

HEAD_TOLERANCE = 1e-3  # cosine units: a request-time head may differ from the build's by this much, at most


def check_text_structure(path: Path, graph: TextGraph) -> None:
    """onnx.checker, then the contract: int64 `tokens` [batch, context] in, float32 `text_embedding` [batch, D] out."""
    model, inputs = checked_graph(path)
    expected = {TEXT_INPUT: (onnx.TensorProto.INT64, graph.context_length),
                TEXT_OUTPUT: (onnx.TensorProto.FLOAT, graph.width)}
    found = {value.name: value.type.tensor_type for value in [*inputs, *model.output]}
    if list(found) != list(expected):
        raise PatcherError(f"{path.name} has tensors {list(found)}, expected {list(expected)}")
    for name, (element, width) in expected.items():
        tensor = found[name]
        batch, second = tensor.shape.dim[0], tensor.shape.dim[1]
        if tensor.elem_type != element or second.dim_value != width:
            raise PatcherError(f"{path.name}: {name} is not {onnx.TensorProto.DataType.Name(element)} [batch, {width}]")
        if batch.HasField("dim_value") or not batch.dim_param:
            raise PatcherError(f"{path.name}: the batch axis of {name} is fixed, not dynamic")


def run_text_session(path: Path, tokens: np.ndarray) -> np.ndarray:
    """The text model's embeddings of every row, fed in the batch sizes of `batch_plan`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = []
    for rows in batch_plan(len(tokens)):
        try:
            parts.append(session.run([TEXT_OUTPUT], {TEXT_INPUT: tokens[rows]})[0])
        except Exception as error:  # onnxruntime raises its own types; a frozen batch dimension fails here
            first = str(error).splitlines()[0][:200]
            raise PatcherError(f"{path.name} fails at batch size {rows.stop - rows.start} in onnxruntime "
                               f"({first}): the export is broken") from None
    return np.concatenate(parts)


@torch.no_grad()
def torch_embeddings(graph: TextGraph, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """PyTorch's text embeddings of every row: the numbers ONNX must reproduce."""
    chunks = [graph(torch.from_numpy(tokens[start : start + batch_size])) for start in range(0, len(tokens),
                                                                                              batch_size)]
    return torch.cat(chunks).numpy()


def verify_text_model(path: Path, graph: TextGraph, prompts: dict[str, np.ndarray], heads: dict[str, Any],
                      heldout: HeldOut, embeddings: torch.Tensor) -> dict[str, Any]:
    """Structure, load, embeddings and heads of one text model; its report, or PatcherError.

    `prompts` are each task's token ids (class-major), `heads` the stored heads to reproduce, by task, with
    (templates per class, head) for the tasks whose heads come from the text tower, `embeddings` PyTorch's image
    embeddings of the held-out images."""
    check_text_structure(path, graph)
    check_loads(path)
    tasks = list(prompts)
    tokens = np.concatenate([prompts[task] for task in tasks])
    count = len(tokens)
    rows = np.resize(np.arange(count), max(count, sum(BATCH_SIZES)))
    got = run_text_session(path, tokens[rows])[:count]
    want = torch_embeddings(graph, tokens)
    rule = rule_for("fp32")
    max_abs_diff = {TEXT_OUTPUT: float(np.abs(got - want).max())}
    head_diffs, parity, start = {}, {}, 0
    labels = heldout.labels.numpy()
    image = embeddings.numpy()
    for task in tasks:
        span = slice(start, start + len(prompts[task]))
        start = span.stop
        if task not in heads:
            continue
        templates, stored = heads[task]
        stored = stored.numpy()
        scale = float(np.linalg.norm(stored, axis=0).mean())
        head = class_heads(got[span], stored.shape[1], templates, scale)
        head_diffs[task] = float(np.abs(head - stored).max() / scale)
        rows_ = heldout.spans[task]
        parity[task] = task_parity(image[rows_] @ stored, image[rows_] @ head, labels[rows_], scale, rule)
    problems = failures(parity, max_abs_diff, rule)
    problems += [f"{task} head differs from the build's by {diff:.2e} > {HEAD_TOLERANCE:g} (cosine units)"
                 for task, diff in head_diffs.items() if not diff <= HEAD_TOLERANCE]
    report = {
        "prompts": count,
        "batch_sizes": sorted({r.stop - r.start for r in batch_plan(len(rows))}),
        "max_abs_diff": max_abs_diff,
        "head_max_cosine_diff": head_diffs,
        "head_tolerance": HEAD_TOLERANCE,
        "tasks": parity,
        "problems": problems,
        "passed": not problems,
    }
    if problems:
        raise PatcherError(f"{path.name} fails the parity check on {count} prompts of the run: {'; '.join(problems)}; "
                           "nothing was written")
    return report
