"""The write step `patcher build` and `patcher merge` share: a run directory from what the stage computed.

    models/<kind>.safetensors, text/<kind>.safetensors   encoder + heads (and text tower) of each stored model
    open_clip_config.json, alpha_curve*.png              how to rebuild the encoder; the alpha curves
    wiseft.png, per_class_accuracy.json                  patch task against the others; accuracy per class
    timings.json, manifest.json                          the manifest last: a staging directory holding one is whole

Files are byte-identical for the same tensors (`save_tensors`); the manifest holds no clock (timings.json does).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from patcher.base.files import now_iso, write_json
from patcher.base.tensorfile import save_tensors
from patcher.base.versions import versions
from patcher.data.metrics import Scores
from patcher.models.heads import HeadResolver
from patcher.models.state import TEXT_PREFIX, State, classifier_state, has_text, part
from patcher.patching.strategies import Outcome
from patcher.runs.layout import (
    ALPHA_CURVE,
    KINDS,
    OPEN_CLIP_CONFIG,
    TEXT_KINDS,
    TIMINGS,
    WISEFT_PLOT,
    alpha_curve_step,
    model_file,
    text_file,
)
from patcher.runs.manifest import (
    RUN_FORMAT,
    TIMINGS_FORMAT,
    AlphaRecord,
    BaseModel,
    Manifest,
    MergedTraining,
    MethodRecord,
    TaskRecord,
    TextTower,
    TrainingRecord,
    files_record,
    write_manifest,
)
from patcher.runs.per_class import PER_CLASS_FORMAT, AlphaPerClass, PerClassRecord, TaskPerClass, write_per_class
from patcher.runs.plots import CurveRoles, alpha_curve_plot, wiseft_plot


@dataclass(kw_only=True)
class RunContents:
    """Everything a run directory holds, as the stage computed it."""

    name: str
    options_sha256: str
    model: BaseModel
    open_clip_config: dict[str, Any]
    tasks: dict[str, TaskRecord]  # patch tasks first
    method: MethodRecord
    training: TrainingRecord | MergedTraining
    outcome: Outcome
    alpha: AlphaRecord
    test_accuracy: dict[str, dict[str, float]]
    resolver: HeadResolver  # turns the outcome's states into encoder + heads
    timings: dict[str, float]
    test_scores: dict[str, dict[str, Scores]] | None = None  # by model and task: macro-F1, worst and per class

    def roles(self, role: str) -> list[str]:
        """The tasks with this role, in order."""
        return [task for task, record in self.tasks.items() if record.role == role]


def write_models(staging: Path, resolver: HeadResolver, states: Mapping[str, State],
                 alphas: Mapping[str, float]) -> dict[str, str]:
    """models/<kind>.safetensors for each state (encoder + every head), and text/<kind> where a text tower was
    trained; returns the text files written by kind."""
    (staging / "models").mkdir(exist_ok=True)
    text_files = {}
    for kind in KINDS:
        encoder, heads = resolver.resolve(states[kind])
        metadata = {"model": kind, "alpha": f"{alphas[kind]:g}"}
        save_tensors(classifier_state(encoder, heads), staging / model_file(kind), metadata)
        if kind in TEXT_KINDS and has_text(states[kind]):
            (staging / "text").mkdir(exist_ok=True)
            text = {k: v.contiguous() for k, v in part(TEXT_PREFIX, states[kind]).items()}
            save_tensors(text, staging / text_file(kind), metadata)
            text_files[kind] = text_file(kind)
    return text_files


def plot_curves(staging: Path, contents: RunContents) -> None:
    """alpha_curve.png for the selection behind the patched model, alpha_curve_step<k>.png for each step, and
    wiseft.png (patch accuracy against every other task's over the alphas tried) when the run has other tasks."""
    outcome, support, monitored = contents.outcome, contents.roles("support"), contents.roles("monitor")
    alpha = contents.alpha
    tolerance = (alpha.tolerances or alpha.tolerance) if support else None
    roles = CurveRoles(patch=contents.roles("patch"), monitored=monitored, zeroshot=outcome.reference,
                       tolerance=tolerance)
    alpha_curve_plot(outcome.selection.curve, outcome.selection.alpha, staging / ALPHA_CURVE, roles, outcome.title)
    for number, (task, step) in enumerate(outcome.step_plots(), start=1):
        alpha_curve_plot(step.curve, step.alpha, staging / alpha_curve_step(number), replace(roles, patch=[task]),
                         title=f"step {number} ({task}): held-out accuracy")
    if support or monitored:
        by_task = {task: record.role for task, record in contents.tasks.items()}
        wiseft_plot(outcome.selection.curve, outcome.selection.alpha, staging / WISEFT_PLOT, contents.roles("patch"),
                    by_task, title=f"{', '.join(contents.roles('patch'))}: the others over alpha (held-out)")


def per_class(contents: RunContents) -> PerClassRecord | None:
    """Every task's accuracy per class: on test for each stored model, held-out at each alpha evaluated."""
    tested = contents.test_scores
    if tested is None:
        return None
    evaluated = contents.outcome.selection.scores
    tasks = {}
    for task, record in contents.tasks.items():
        val = [AlphaPerClass(a, evaluated[a][task].per_class) for a in sorted(evaluated) if task in evaluated[a]]
        tasks[task] = TaskPerClass(list(record.label_names), [int(n) for n in tested["zeroshot"][task].support],
                                   {kind: tested[kind][task].per_class for kind in KINDS}, val)
    return PerClassRecord(PER_CLASS_FORMAT, tasks)


def test_metric(contents: RunContents, name: str) -> dict[str, dict[str, float]]:
    """One test metric (data.metrics.METRICS) by model and task; empty without test scores."""
    tested = contents.test_scores or {}
    return {kind: {task: getattr(scores, name) for task, scores in by_task.items()} for kind, by_task in tested.items()}


def write_run(staging: Path, contents: RunContents) -> None:
    """Every file of the run, the manifest last."""
    text_files = write_models(staging, contents.resolver, contents.outcome.states, contents.outcome.alphas)
    (staging / OPEN_CLIP_CONFIG).write_text(json.dumps(contents.open_clip_config, indent=2) + "\n")
    plot_curves(staging, contents)
    per_class_record = per_class(contents)
    if per_class_record is not None:
        write_per_class(staging, per_class_record)
    manifest = Manifest(
        format=RUN_FORMAT, name=contents.name, options_sha256=contents.options_sha256, model=contents.model,
        tasks=contents.tasks, patch_tasks=contents.roles("patch"), support_tasks=contents.roles("support"),
        monitor_tasks=contents.roles("monitor"), method=contents.method, multi=contents.outcome.multi_record(),
        text_tower=TextTower(bool(text_files), text_files), training=contents.training, alpha=contents.alpha,
        test_accuracy=contents.test_accuracy, test_macro_f1=test_metric(contents, "macro_f1"),
        test_worst_class_accuracy=test_metric(contents, "worst_class_accuracy"), files=files_record(staging),
        versions=versions(),
    )
    write_json(staging / TIMINGS, {"format": TIMINGS_FORMAT, "created": now_iso(),
                                   "timings_s": {key: round(value, 3) for key, value in contents.timings.items()}})
    write_manifest(staging, manifest)
