"""Writing a run directory's files: the three classifiers, text towers, the alpha plot, manifest sections."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from patcher.data.tasks import Task
from patcher.models import LoadedModel, preprocess_spec
from patcher.models.heads import HeadResolver
from patcher.models.state import TEXT_PREFIX, State, classifier_state, has_text, part
from patcher.patching.alpha import DEFAULT_GRID, Selection
from patcher.runs.manifest import RUN_FORMAT, TIMINGS, TIMINGS_FORMAT, files_record, now_iso, versions
from patcher.runs.plots import alpha_curve_plot
from patcher.runs.store import write_json
from patcher.runs.tensorfile import save_tensors

KINDS = ("zeroshot", "finetuned", "patched")
MODEL_FILES = {kind: f"models/{kind}.safetensors" for kind in KINDS}
TEXT_FILES = {kind: f"text/{kind}.safetensors" for kind in ("finetuned", "patched")}


def write_models(staging: Path, resolver: HeadResolver, states: Mapping[str, State],
                 alphas: Mapping[str, float]) -> dict[str, str]:
    """models/<kind>.safetensors for each state (encoder + every head), and text/<kind> where a text tower was
    trained, byte-identical for the same tensors (`save_tensors`); returns the text files written by kind."""
    (staging / "models").mkdir(exist_ok=True)
    text_files = {}
    for kind in KINDS:
        encoder, heads = resolver.resolve(states[kind])
        metadata = {"model": kind, "alpha": f"{alphas[kind]:g}"}
        save_tensors(classifier_state(encoder, heads), staging / MODEL_FILES[kind], metadata)
        if kind in TEXT_FILES and has_text(states[kind]):
            (staging / "text").mkdir(exist_ok=True)
            text = {k: v.contiguous() for k, v in part(TEXT_PREFIX, states[kind]).items()}
            save_tensors(text, staging / TEXT_FILES[kind], metadata)
            text_files[kind] = TEXT_FILES[kind]
    return text_files


def plot_curves(staging: Path, selection: Selection, patch: list[str], support: list[str], tolerance: float,
                title: str, reference: Mapping[str, float] | None = None,
                steps: list[tuple[str, Selection]] | None = None) -> None:
    """alpha_curve.png for the final selection and alpha_curve_step<k>.png for each step of a sequential run."""
    zeroshot = dict(reference) if reference is not None else selection.curve[0.0]
    alpha_curve_plot(selection.curve, selection.alpha, staging / "alpha_curve.png", patch, zeroshot,
                     tolerance if support else None, title=title)
    for number, (task, step) in enumerate(steps or [], start=1):
        alpha_curve_plot(step.curve, step.alpha, staging / f"alpha_curve_step{number}.png", [task], zeroshot,
                         tolerance if support else None, title=f"step {number} ({task}): held-out accuracy")


def base_model_record(loaded: LoadedModel, image_size: int | None) -> dict[str, Any]:
    """The manifest's `model` section: the base model a run starts from."""
    return {
        "name": loaded.name,
        "pretrained": loaded.pretrained,
        "image_size": image_size,
        "weights_sha256": loaded.weights_sha256,
        "embed_dim": loaded.embed_dim,
        "preprocess": preprocess_spec(loaded.preprocess_cfg),
    }


def task_record(task: Task, role: str, sizes: Mapping[str, int]) -> dict[str, Any]:
    """One entry of the manifest's `tasks` section."""
    return {"role": role, "classnames": list(task.classnames), "templates": list(task.templates),
            "sizes": dict(sizes)}


def alpha_record(selection: Selection, mode: str, search: str, tolerance: float,
                 reference: Mapping[str, float]) -> dict[str, Any]:
    """The manifest's `alpha` section for the selection behind the patched model."""
    return {
        "mode": mode,
        "chosen": selection.alpha,
        "rule": selection.rule,
        "tolerance": tolerance,
        "search": search,
        "evaluations": selection.evaluations,
        "grid": list(DEFAULT_GRID),
        "warning": selection.warning,
        "curve": [{"alpha": a, "val_accuracy": acc} for a, acc in sorted(selection.curve.items())],
        "zeroshot_val_accuracy": dict(reference),
    }


def run_manifest(
    staging: Path,
    name: str,
    options_sha256: str,
    model: Mapping[str, Any],
    tasks: Mapping[str, Mapping[str, Any]],
    method: Mapping[str, Any],
    multi: Mapping[str, Any] | None,
    training: Mapping[str, Any],
    alpha: Mapping[str, Any],
    test_accuracy: Mapping[str, Mapping[str, float]],
    text_files: Mapping[str, str],
) -> dict[str, Any]:
    """manifest.json's content (docs/contracts.md), with the file hashes of everything written to `staging`."""
    return {
        "format": RUN_FORMAT,
        "name": name,
        "options_sha256": options_sha256,
        "model": dict(model),
        "tasks": {task: dict(entry) for task, entry in tasks.items()},
        "patch_tasks": [task for task, entry in tasks.items() if entry["role"] == "patch"],
        "support_tasks": [task for task, entry in tasks.items() if entry["role"] == "support"],
        "method": dict(method),
        "multi": None if multi is None else dict(multi),
        "text_tower": {"trained": bool(text_files), "files": dict(text_files)},
        "training": dict(training),
        "alpha": dict(alpha),
        "test_accuracy": {kind: dict(values) for kind, values in test_accuracy.items()},
        "files": files_record(staging),
        "versions": versions(),
    }


def write_timings(staging: Path, timings: Mapping[str, float]) -> None:
    """timings.json: when the run was made and how long each part took, kept out of the manifest so that the same
    inputs and seed write a byte-identical manifest (and ONNX files, which cite its hash)."""
    write_json(staging / TIMINGS, {"format": TIMINGS_FORMAT, "created": now_iso(),
                                   "timings_s": {key: round(value, 3) for key, value in timings.items()}})
