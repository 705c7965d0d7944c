"""The parity rule: sound on any CPU (near-ties that a float path flips do not fail it), and still failing exports
that are broken: another model's weights, a wrong head, a wrong normalisation, a frozen batch dimension."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from patcher.base.errors import PatcherError
from patcher.export.contract import logits_output
from patcher.export.graph import ExportGraph, load_graph, reference_outputs
from patcher.export.heldout import HeldOut, load_heldout
from patcher.export.parity import RULES, failures, margins, task_parity
from patcher.export.trace import TRACE_BATCH, export_onnx, mha_fastpath_disabled, save_onnx
from patcher.export.variants import to_fp16
from patcher.export.verify import verify_model

TASKS = ["digits", "fashion-mnist"]


class Case:
    """The tiny run's patched classifier, its held-out images and PyTorch's outputs on them."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.config = json.loads((run / "open_clip_config.json").read_text())
        self.heldout: HeldOut = load_heldout(TASKS, self.config["preprocess_cfg"], per_task=128)
        self.graph = self.load("patched")
        self.reference = reference_outputs(self.graph, self.heldout.images)
        size = self.config["preprocess_cfg"]["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def load(self, kind: str) -> ExportGraph:
        return load_graph(self.config, self.run / f"models/{kind}.safetensors", TASKS)

    def export(self, module: nn.Module, path: Path) -> Path:
        save_onnx(export_onnx(module, path, self.size, 17), path)  # type: ignore[arg-type]
        return path


@pytest.fixture(scope="module")
def case(tiny_run: Path) -> Case:
    return Case(tiny_run)


def flip_nearest_ties(reference: np.ndarray, count: int) -> np.ndarray:
    """The reference with the top-1 and top-2 logits swapped on its `count` least decisive rows: what a CPU whose
    float path differs by about those rows' margins does to them."""
    candidate = reference.copy()
    top = np.argsort(reference, axis=1)[:, -2:]
    nearest = np.argsort(reference[np.arange(len(reference)), top[:, 1]] -
                         reference[np.arange(len(reference)), top[:, 0]])[:count]
    for row in nearest:
        first, second = top[row, 1], top[row, 0]
        candidate[row, [first, second]] = candidate[row, [second, first]]
    return candidate


def test_near_ties_flipped_by_a_float_path_pass_where_the_old_rule_failed(case: Case) -> None:
    rule = RULES["fp16"]
    scales = case.graph.logit_scales()
    tasks = {}
    for task in TASKS:
        span = case.heldout.spans[task]
        reference = case.reference[1 + TASKS.index(task)].numpy()[span]
        candidate = flip_nearest_ties(reference, 2)
        moved = np.abs(candidate - reference).max() / scales[task]
        assert moved < rule.decisive_margin / 2  # within what this precision may move a logit
        tasks[task] = task_parity(reference, candidate, case.heldout.labels.numpy()[span], scales[task], rule)
        assert tasks[task]["top1_agreement"] < 99.5  # the old rule (every image) would have failed this export
        assert tasks[task]["decisive_top1_agreement"] == 100.0
    assert failures(tasks, {}, rule) == []


def test_decisiveness_depends_on_the_reference_alone() -> None:
    reference = np.array([[3.0, 1.0, 0.0], [1.0, 0.99, 0.0], [5.0, 5.0, 0.0]])
    assert margins(reference, 10.0).tolist() == pytest.approx([0.2, 0.001, 0.0])
    labels = np.array([0, 0, 1])
    report = task_parity(reference, reference[:, [1, 0, 2]], labels, 10.0, RULES["fp16"])
    assert report["decisive_images"] == 1 and report["decisive_top1_agreement"] == 0.0


def test_the_gate_records_its_rule(tiny_export: Path) -> None:
    record = json.loads((tiny_export / "export.json").read_text())
    assert record["parity"]["thresholds"]["fp16"]["decisive_margin"] == RULES["fp16"].decisive_margin
    for report in record["parity"]["models"].values():
        assert report["passed"] and report["problems"] == []
        for task in TASKS:
            figures = report["tasks"][task]
            assert figures["decisive_top1_agreement"] == 100.0
            assert figures["decisive_images"] >= figures["images"] // 2


def test_a_correct_fp16_export_passes(case: Case, tmp_path: Path) -> None:
    path = case.export(case.graph, tmp_path / "patched.onnx")
    half = tmp_path / "patched_fp16.onnx"
    save_onnx(to_fp16(onnx.load(str(path))), half)
    report = verify_model(half, "fp16", case.graph, case.heldout, case.reference)
    assert report["passed"]


class _Delegating(nn.Module):
    """A module around the classifier with its output names and widths."""

    def __init__(self, graph: ExportGraph) -> None:
        super().__init__()
        self.graph = graph

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    def output_widths(self) -> dict[str, int]:
        return self.graph.output_widths()


class _WrongNormalisation(_Delegating):
    """The classifier fed pixels left in 0-255 (the division by 255 forgotten before CLIP's mean and std). A
    normalisation applied twice is no test here: on grayscale images it is nearly an affine map that the tiny
    model's LayerNorm absorbs, so the export is nearly right on this data and may pass."""

    def __init__(self, graph: ExportGraph, mean: list[float], std: list[float]) -> None:
        super().__init__(graph)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixels = image * self.std + self.mean  # what the client sent, in 0-1
        return self.graph((pixels * 255 - self.mean) / self.std)


def _wrong_head(case: Case) -> ExportGraph:
    graph = case.load("patched")
    head = graph.classifier.head("digits")
    head.copy_(head.roll(1, dims=1))  # every digit's class embedding under its neighbour's name
    return graph


@pytest.mark.parametrize("broken", ["other weights", "wrong head", "wrong normalisation"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_broken_exports_fail(case: Case, tmp_path: Path, broken: str, precision: str) -> None:
    if broken == "other weights":
        module: nn.Module = case.load("finetuned")
    elif broken == "wrong head":
        module = _wrong_head(case)
    else:
        preprocess = case.config["preprocess_cfg"]
        module = _WrongNormalisation(case.load("patched"), preprocess["mean"], preprocess["std"]).eval()
    path = case.export(module, tmp_path / "patched.onnx")
    if precision == "fp16":
        half = tmp_path / "patched_fp16.onnx"
        save_onnx(to_fp16(onnx.load(str(path))), half)
        path = half
    with pytest.raises(PatcherError, match="fails the parity check") as failure:
        verify_model(path, precision, case.graph, case.heldout, case.reference)
    if broken == "wrong head":
        assert "digits top-1 agreement" in str(failure.value)
    assert logits_output("digits") in str(failure.value) or "digits" in str(failure.value)


class _FrozenBatch(_Delegating):
    """The classifier behind a reshape that names the traced batch size as a constant (what a tracer baking the
    batch into a reshape produces); its inputs and outputs still declare a dynamic batch."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.graph(image.reshape(TRACE_BATCH, *image.shape[1:]))


def test_a_frozen_batch_dimension_fails(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "patched.onnx"
    names = case.graph.output_names
    with torch.no_grad(), mha_fastpath_disabled():
        torch.onnx.export(case.graph, (torch.zeros(TRACE_BATCH, 3, *case.size),), str(path), input_names=["image"],
                          output_names=names, opset_version=17, dynamo=False)
    with pytest.raises(PatcherError, match="batch axis of image is fixed"):
        verify_model(path, "fp32", case.graph, case.heldout, case.reference)
    frozen = case.export(_FrozenBatch(case.graph), tmp_path / "frozen.onnx")
    with pytest.raises(PatcherError, match="fails at batch size 1 in onnxruntime"):
        verify_model(frozen, "fp32", case.graph, case.heldout, case.reference)
