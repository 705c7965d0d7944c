"""`patcher export RUN`: ONNX models of a run's patched and zero-shot classifiers, verified, with export.json.

Read top to bottom, `Export.run`: the run's manifest, config and weights are checked against each other
(`runs/weights.py`); the output is locked and what a killed export left is removed; an export already there with
the same run and options is kept; otherwise held-out images are loaded, each classifier is traced
(`export/trace.py`), optionally optimised and converted to fp16 (`export/variants.py`), checked against PyTorch
(`export/verify.py`, `export/parity.py`), and export.json is written (`export/contract.py`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patcher.base.errors import PatcherError
from patcher.base.faults import write_errors
from patcher.base.files import FileRecord, now_iso
from patcher.base.locks import check_output_name, output_lock
from patcher.base.progress import console, make_progress
from patcher.base.staging import clean_stale, staged_output
from patcher.base.versions import versions
from patcher.export.contract import (
    EXPORT_FORMAT,
    EXPORT_JSON,
    ContentOptions,
    ExportedModel,
    ExportedSample,
    ExportedTask,
    ExportRecord,
    SourceRun,
    TextExport,
    TextModel,
    logits_output,
    model_key,
    output_names,
    tensor_entries,
    text_entries,
    write_export_record,
)
from patcher.export.contract import text_file as contract_text_file
from patcher.export.graph import ExportGraph, load_graph, reference_outputs
from patcher.export.heldout import SPLIT, HeldOut, load_heldout
from patcher.export.metadata import EXPORTER, attach_metadata, metadata_props
from patcher.export.reuse import IMAGES_PER_TASK, existing_export, select_tasks
from patcher.export.samples import write_samples
from patcher.export.text import (
    base_model,
    check_tokenizer,
    copy_vocabulary,
    export_text_onnx,
    load_text_graph,
    run_prompts,
    text_metadata,
    text_state,
    tokenizer_spec,
)
from patcher.export.text_verify import verify_text_model
from patcher.export.trace import check_opset, export_onnx, save_onnx
from patcher.export.variants import OPTIMIZATION_LEVEL, optimize_onnx, to_fp16, to_int8
from patcher.export.verify import thresholds, verify_model
from patcher.runs.layout import EXPORT_DIR, EXPORTED_KINDS
from patcher.runs.manifest import load_run
from patcher.runs.weights import verified_config, verified_weights


@dataclass(frozen=True)
class ExportOptions:
    """What `patcher export` takes."""

    out: Path | None = None  # default RUN/onnx
    fp16: bool = False
    int8: bool = False
    optimize: bool = False
    opset: int = 17
    tasks: list[str] | None = None  # default: every task of the run
    overwrite: bool = False
    data_dir: Path | None = None
    images_per_task: int = IMAGES_PER_TASK
    accuracy_tolerance: float | None = None  # points a variant's accuracy may differ by; None: its precision's rule
    # the text tower (label sets at request time), from the run's base model: True requires it; None (auto) exports
    # it when that model loads with the weights the run recorded, else warns and exports the image graphs only
    text: bool | None = None


class Export:
    """One `patcher export`, its state kept on this object: `run` checks, traces, verifies and writes."""

    def __init__(self, run_path: Path, options: ExportOptions) -> None:
        self.started = time.perf_counter()
        check_opset(options.opset)
        if options.accuracy_tolerance is not None and not options.accuracy_tolerance >= 0:
            raise PatcherError(f"--accuracy-tolerance must be 0 points or more, got {options.accuracy_tolerance}")
        if options.images_per_task < 1:
            raise PatcherError(f"images per task must be at least 1, got {options.images_per_task}")
        self.options = options
        self.run_record = load_run(run_path)
        self.tasks = select_tasks(self.run_record, options.tasks)
        output_names(self.tasks)
        self.out = Path(options.out) if options.out is not None else self.run_record.path / EXPORT_DIR
        check_output_name(self.out)
        self.content = ContentOptions(tasks=list(self.tasks), fp16=options.fp16, optimize=options.optimize,
                                      opset=options.opset, images_per_task=options.images_per_task, int8=options.int8,
                                      text_tower=bool(options.text))
        self.config = verified_config(self.run_record)
        self.weights = {kind: verified_weights(self.run_record, kind, self.tasks) for kind in EXPORTED_KINDS}
        self.timings: dict[str, float] = {}
        self.embeddings: dict[str, torch.Tensor] = {}  # PyTorch's held-out image embeddings, by kind

    def run(self) -> Path:
        """The export directory: written, or kept when it already holds this export."""
        out = self.out
        with output_lock(out):
            with write_errors(out):
                clean_stale(out)
            ignored = ("text_tower",) if self.options.text is None else ()  # auto: whatever the export has
            if existing_export(out, self.run_record, self.content, self.options.overwrite, ignored):
                console.print(f"{out} is up to date: same run and options, nothing to do")
                return out
            heldout = self._timed("images", self.heldout)
            with staged_output(out, overwrite=out.exists()) as staging:
                folder = staging.open()
                models, reports, widths = self.export_models(folder, heldout)
                samples = write_samples(folder, heldout, self.run_record.manifest.model.preprocess)
                wanted = self.options.text is not False
                text = self._timed("text", lambda: self.export_text(folder, heldout)) if wanted else None
                self.content = dataclasses.replace(self.content, text_tower=text is not None)
                self.timings["total"] = time.perf_counter() - self.started
                write_export_record(folder / EXPORT_JSON, self.record(models, reports, widths, samples, text))
        return out

    def _timed(self, key: str, work: Any) -> Any:
        tick = time.perf_counter()
        result = work()
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - tick
        return result

    def heldout(self) -> HeldOut:
        """The held-out images the parity check runs on (unusable image files left out, as the build left out
        those it was told to)."""
        sources = {name: record.source for name, record in self.run_record.manifest.tasks.items()}
        return load_heldout(self.tasks, self.config["preprocess_cfg"], self.options.images_per_task,
                            self.options.data_dir, sources)

    def export_models(self, folder: Path, heldout: HeldOut) -> tuple[dict[str, ExportedModel], dict[str, Any],
                                                                      dict[str, int]]:
        """Write and verify every model; their records, parity reports, and output widths."""
        precisions = ["fp32", *(["fp16"] if self.options.fp16 else []), *(["int8"] if self.options.int8 else [])]
        models: dict[str, ExportedModel] = {}
        reports: dict[str, Any] = {}
        widths: dict[str, int] = {}
        tolerance = self.options.accuracy_tolerance
        with make_progress() as progress:
            bar = progress.add_task("exporting", total=len(EXPORTED_KINDS) * len(precisions), status="")
            for kind in EXPORTED_KINDS:
                graph = self._timed("torch_reference", lambda k=kind: load_graph(self.config, self.weights[k],
                                                                                 self.tasks))
                reference = self._timed("torch_reference", lambda g=graph: reference_outputs(g, heldout.images))
                self.embeddings[kind] = reference[0]
                widths = graph.output_widths()
                progress.update(bar, status=f"{kind}.onnx")
                for precision, path in self.write_model(folder, graph, kind).items():
                    progress.update(bar, status=f"checking {path.name}")
                    key = model_key(kind, precision)
                    reports[key] = self._timed("verify", lambda p=path, q=precision, g=graph, r=reference:
                                               verify_model(p, q, g, heldout, r, tolerance))
                    record = FileRecord.of(path)
                    models[key] = ExportedModel(file=path.name, sha256=record.sha256, bytes=record.bytes,
                                                precision=precision, model=kind,
                                                alpha=self.run_record.manifest.alpha_of(kind),
                                                optimization=self.optimization or "none")
                    progress.advance(bar)
        return models, reports, widths

    @property
    def optimization(self) -> str | None:
        """onnxruntime's offline optimisation level applied, if any."""
        return OPTIMIZATION_LEVEL if self.options.optimize else None

    def write_model(self, folder: Path, graph: ExportGraph, kind: str) -> dict[str, Path]:
        """Write `<kind>.onnx` and, with fp16, `<kind>_fp16.onnx` (converted from the final float32 graph); with
        int8, `<kind>_int8.onnx` (quantised from the traced graph, before any optimisation fuses its MatMuls)."""
        height, width = self.run_record.manifest.model.preprocess.image_size
        path = folder / f"{model_key(kind, 'fp32')}.onnx"
        traced = folder / f".{kind}.traced.onnx"
        model = self._timed("torch_export", lambda: export_onnx(graph, traced, (height, width), self.options.opset))
        save_onnx(model, traced)  # with the shapes set_io_shapes fixed in memory
        quantised = None
        if self.options.int8:
            int8_path = folder / f"{model_key(kind, 'int8')}.onnx"
            quantised = self._timed("int8", lambda: to_int8(traced, int8_path))
            attach_metadata(quantised, self.metadata(kind, "int8"))
            save_onnx(quantised, int8_path)
        if self.optimization:
            model = self._timed("optimize", lambda: optimize_onnx(traced, path))
        traced.unlink()
        attach_metadata(model, self.metadata(kind, "fp32"))
        save_onnx(model, path)
        paths = {"fp32": path}
        if self.options.fp16:
            half = self._timed("fp16", lambda: to_fp16(model))
            attach_metadata(half, self.metadata(kind, "fp16"))
            paths["fp16"] = folder / f"{model_key(kind, 'fp16')}.onnx"
            save_onnx(half, paths["fp16"])
        if quantised is not None:
            paths["int8"] = folder / f"{model_key(kind, 'int8')}.onnx"
        return paths

    def metadata(self, kind: str, precision: str) -> dict[str, str]:
        """The ONNX metadata of one file."""
        return metadata_props(self.run_record, kind, precision, self.options.opset, self.exported_tasks(),
                              self.optimization)

    def exported_tasks(self) -> dict[str, ExportedTask]:
        """Role, class names and output of each exported task, in output order."""
        manifest = self.run_record.manifest
        return {task: ExportedTask(manifest.tasks[task].role, list(manifest.tasks[task].classnames),
                                   logits_output(task)) for task in self.tasks}

    def export_text(self, folder: Path, heldout: HeldOut) -> TextExport | None:
        """The text tower of each exported model (one file when the method left it untouched), the tokenizer's
        vocabulary, each checked against PyTorch and against the heads the build stored; None (with a warning)
        when the text tower is optional and the run's base model or tokenizer cannot give it."""
        manifest = self.run_record.manifest
        try:
            base = base_model(self.run_record)
            context = int(base.model.positional_embedding.shape[0])
            spec, vocabulary = tokenizer_spec(base, context)
        except PatcherError as error:
            if self.options.text:
                raise
            console.print(f"warning: no text tower, the image graphs only (label sets at request time need it): "
                          f"{error}")
            return None
        prompts = run_prompts(self.run_record, self.tasks)
        copy_vocabulary(vocabulary, folder)
        check_tokenizer(base, spec, vocabulary, [p for task in self.tasks for p in prompts[task]])
        tokens = {task: base.tokenizer(prompts[task]).numpy() for task in self.tasks}
        text_models: dict[str, TextModel] = {}
        reports: dict[str, Any] = {}
        written: dict[bool, TextModel] = {}
        for kind in EXPORTED_KINDS:
            state, trained = text_state(self.run_record, kind, base)
            graph = load_text_graph(self.config, state)
            alpha = manifest.alpha_of(kind) if trained else 0.0
            heads = self.text_heads(kind)
            if not trained and False in written:  # the base tower, already written for the other kind
                text_models[kind] = dataclasses.replace(written[False], model=kind)
                reports[kind] = verify_text_model(folder / written[False].file, graph, tokens, heads, heldout,
                                                  self.embeddings[kind])
                continue
            owner = kind if trained else "zeroshot"  # an untrained tower is the base model's: one file for both
            path = folder / contract_text_file(owner)
            model = export_text_onnx(graph, path, self.options.opset)
            attach_metadata(model, text_metadata(self.run_record, owner, alpha, trained, spec, graph.logit_scale), "")
            save_onnx(model, path)
            reports[kind] = verify_text_model(path, graph, tokens, heads, heldout, self.embeddings[kind])
            record = FileRecord.of(path)
            text_models[kind] = TextModel(file=path.name, sha256=record.sha256, bytes=record.bytes, model=kind,
                                          alpha=alpha, trained=trained, logit_scale=graph.logit_scale)
            written.setdefault(trained, text_models[kind])
        templates = {task: list(manifest.tasks[task].templates) for task in self.tasks}
        source, output = text_entries(context, manifest.model.embed_dim)
        return TextExport(source, output, spec, text_models, templates, {"models": reports})

    def text_heads(self, kind: str) -> dict[str, tuple[int, torch.Tensor]]:
        """The stored heads of `kind` that the text tower made (probed heads left out), with templates per class."""
        from safetensors.torch import load_file

        from patcher.models.state import split_classifier_state

        _, heads = split_classifier_state(load_file(str(self.weights[kind])))
        manifest = self.run_record.manifest
        trained = set(manifest.method.head_tasks)
        return {task: (len(manifest.tasks[task].templates), heads[task]) for task in self.tasks if task not in trained}

    def record(self, models: dict[str, ExportedModel], reports: dict[str, Any], widths: dict[str, int],
               samples: dict[str, ExportedSample], text: TextExport | None = None) -> ExportRecord:
        """export.json."""
        run, manifest = self.run_record, self.run_record.manifest
        image, outputs = tensor_entries(manifest.model.preprocess, widths, self.tasks)
        return ExportRecord(
            format=EXPORT_FORMAT, run=SourceRun(run.name, run.manifest_sha256, manifest.model.name),
            alpha=manifest.alpha_of("patched"), opset=self.options.opset, exporter=EXPORTER, options=self.content,
            preprocess=manifest.model.preprocess, input=image, outputs=outputs, tasks=self.exported_tasks(),
            models=models, parity={"split": SPLIT, "thresholds": thresholds(self.options.accuracy_tolerance),
                                   "models": reports},
            versions=versions(), timings_s={key: round(value, 3) for key, value in self.timings.items()},
            created=now_iso(), samples=samples, text=text,
        )


def export_run(run_path: Path, options: ExportOptions | None = None) -> Path:
    """Export a run's patched and zero-shot classifiers to verified ONNX models; returns the export directory.

    The manifest is checked against the weights first; `out` is locked while it is written, and what a killed
    export left beside it is removed; a fault while writing (a full disk) is one PatcherError, nothing written.
    """
    return Export(Path(run_path), options or ExportOptions()).run()
