"""What a benchmark knows when it has the run: its export, graphs, the output-space ensemble ONNX, FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from patcher.base.errors import PatcherError
from patcher.benchmark.defaults import INT8_KIND
from patcher.benchmark.flops import flops_per_image
from patcher.benchmark.outensemble import KIND as OUTENSEMBLE
from patcher.benchmark.outensemble import export_outensemble, run_graphs
from patcher.export.contract import EXPORT_JSON, ExportRecord, read_export_record, verified_model_file
from patcher.runs.layout import EXPORT_DIR
from patcher.runs.manifest import Run


@dataclass(kw_only=True)
class RunContext:
    """A run prepared for benchmarking: export directory, ONNX file and PyTorch graph of each kind, FLOPs."""

    run: Run
    export: ExportRecord  # RUN/onnx's export.json, checked to be this manifest's export
    onnx: dict[str, Path]
    graphs: dict[str, nn.Module]
    flops: dict[str, int]
    output: str  # the patch task's logits output

    @property
    def export_dir(self) -> Path:
        """RUN/onnx."""
        return self.run.path / EXPORT_DIR

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the graphs take."""
        height, width = self.export.preprocess.image_size
        return int(height), int(width)

    def record(self) -> dict[str, Any]:
        """The report's record of the run."""
        return {
            "name": self.run.name,
            "path": str(self.run.path),
            "manifest_sha256": self.run.manifest_sha256,
            "alpha": self.run.manifest.alpha.chosen,
            "model": self.run.manifest.model.name,
            "patch_task": self.run.manifest.patch_tasks[0],
            "export": {"dir": str(self.export_dir), "opset": self.export.opset,
                       "optimize": self.export.options.optimize},
        }


def checked_export(run: Run) -> tuple[Path, ExportRecord]:
    """RUN/onnx and its record, checked to be this manifest's export; PatcherError if it is missing or belongs to
    another."""
    export_dir = run.path / EXPORT_DIR
    if not (export_dir / EXPORT_JSON).is_file():
        raise PatcherError(f"{run.path} has no export: run `patcher export {run.path}` first")
    record = read_export_record(export_dir / EXPORT_JSON)
    if record.run.manifest_sha256 != run.manifest_sha256:
        raise PatcherError(
            f"{export_dir} was exported from another manifest of {run.name}: re-run `patcher export {run.path} "
            "--overwrite` first"
        )
    return export_dir, record


def prepare_run(run: Run, workdir: Path, outensemble: bool = True, int8: bool = False) -> RunContext:
    """An exported run's graphs and the output-space ensemble ONNX (in `workdir`); with `int8`, the export's int8
    patched graph too (`patcher export --int8`)."""
    export_dir, record = checked_export(run)
    graphs = run_graphs(run, list(record.tasks))
    onnx = {kind: verified_model_file(export_dir, record, kind) for kind in ("patched", "zeroshot")}
    if outensemble:
        onnx[OUTENSEMBLE] = export_outensemble(graphs[OUTENSEMBLE], record, Path(workdir) / "outensemble.onnx")  # type: ignore[arg-type]
    else:
        graphs.pop(OUTENSEMBLE)
    output = record.tasks[run.manifest.patch_tasks[0]].output
    height, width = record.preprocess.image_size
    flops = {kind: flops_per_image(graph, (int(height), int(width))) for kind, graph in graphs.items()}
    if int8:
        onnx[INT8_KIND] = verified_model_file(export_dir, record, "patched", "int8")  # names `patcher export --int8`
        flops[INT8_KIND] = flops["patched"]  # the same operations, on int8 weights
    return RunContext(run=run, export=record, onnx=onnx, graphs=graphs, flops=flops, output=output)
