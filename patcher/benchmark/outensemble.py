"""WiSE-FT's output-space ensemble as one ONNX graph: both encoders run, their logits are mixed.

It is what a deployment without weight patching serves to get the fine-tuned model's gains while keeping the
zero-shot model's behaviour: one request, two encoder passes. Same input and output tensors as the exported
classifiers, so it is served and measured exactly like them (`<name>_outensemble`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patcher.base.errors import PatcherError
from patcher.export.contract import ExportRecord
from patcher.export.graph import ExportGraph, load_graph
from patcher.export.trace import export_onnx, save_onnx
from patcher.export.variants import optimize_onnx
from patcher.runs.manifest import Run
from patcher.runs.weights import verified_config, verified_weights

KIND = "outensemble"
PARITY_ATOL = 1e-4


class OutputEnsembleGraph(nn.Module):
    """(1 - alpha) * zero-shot logits + alpha * fine-tuned logits, for every task; the embedding mixed likewise."""

    def __init__(self, zeroshot: ExportGraph, finetuned: ExportGraph, alpha: float) -> None:
        super().__init__()
        if zeroshot.output_names != finetuned.output_names:
            raise PatcherError("the zero-shot and fine-tuned models have different heads: rebuild the run")
        self.zeroshot = zeroshot
        self.finetuned = finetuned
        self.alpha = float(alpha)

    @property
    def output_names(self) -> list[str]:
        """The exported classifiers' output names: `embedding`, then `logits_<task>` per task."""
        return self.zeroshot.output_names

    def output_widths(self) -> dict[str, int]:
        """Output widths, as the exported classifiers have them."""
        return self.zeroshot.output_widths()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mixed (L2-normalised) embedding and mixed logits of each task: two encoder passes."""
        first, second = self.zeroshot(image), self.finetuned(image)
        embedding = F.normalize((1 - self.alpha) * first[0] + self.alpha * second[0], dim=-1)
        logits = [(1 - self.alpha) * a + self.alpha * b for a, b in zip(first[1:], second[1:], strict=True)]
        return (embedding, *logits)


def run_graphs(run: Run, tasks: list[str]) -> dict[str, nn.Module]:
    """The PyTorch graphs of a run as exported: patched, zeroshot, and the output-space ensemble at the run's alpha."""
    config = verified_config(run)
    graphs: dict[str, Any] = {kind: load_graph(config, verified_weights(run, kind, tasks), tasks)
                              for kind in ("patched", "zeroshot", "finetuned")}
    alpha = run.manifest.alpha_of("patched")
    graphs[KIND] = OutputEnsembleGraph(graphs["zeroshot"], graphs.pop("finetuned"), alpha).eval()
    return graphs


def export_outensemble(graph: OutputEnsembleGraph, export: ExportRecord, path: Path) -> Path:
    """Write the ensemble graph to ONNX the way `patcher export` wrote the run's classifiers (opset, optimisation)."""
    height, width = export.preprocess.image_size
    traced = path.with_name(f".{path.name}.traced")
    model = export_onnx(graph, traced, (int(height), int(width)), export.opset)  # type: ignore[arg-type]
    if export.options.optimize:
        save_onnx(model, traced)
        optimize_onnx(traced, path)
    else:
        save_onnx(model, path)
    traced.unlink(missing_ok=True)
    check_parity(graph, path, (int(height), int(width)))
    return path


@torch.no_grad()
def check_parity(graph: nn.Module, path: Path, image_size: tuple[int, int]) -> float:
    """Largest |ONNX - PyTorch| over every output at batch 1 and 5; PatcherError above PARITY_ATOL."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 5):
        image = torch.randn(batch, 3, *image_size, generator=torch.Generator().manual_seed(batch))
        expected = [t.numpy() for t in graph(image)]
        got = session.run(None, {session.get_inputs()[0].name: image.numpy()})
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
    if worst > PARITY_ATOL:
        raise PatcherError(f"{path.name} differs from PyTorch by {worst:.2e} (> {PARITY_ATOL}): cannot benchmark it")
    return worst
