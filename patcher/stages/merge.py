"""`patcher merge`: combine finished runs the parallel way (task arithmetic) into one run.

Each run contributes its task vector, fine-tuned minus zero-shot over what its method trained (encoder,
probed heads, text tower); the merged model is zero-shot + coefficient * their sum, the coefficient
chosen on held-out data over the grid 0, 0.1, ..., 1 with PAINT's rule (patch accuracy = mean over every
run's patch tasks). Runs must share the base model (weights digest) and architecture.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from patcher.data.loading import DataOptions, prepare_splits
from patcher.data.tasks import Task, get_task
from patcher.errors import PatcherError
from patcher.models import LoadedModel, build_from_config, load_clip, state_dict_digest
from patcher.models.heads import zero_shot_head
from patcher.models.state import HEAD_PREFIX, TEXT_PREFIX, VISUAL_PREFIX, State, prefixed, split_classifier_state
from patcher.patching.alpha import AlphaRule
from patcher.patching.session import Session
from patcher.patching.strategies import task_arithmetic
from patcher.progress import console
from patcher.runs.manifest import MANIFEST, Run, load_run, options_sha256
from patcher.runs.store import output_directory, write_json
from patcher.runs.writer import (
    MODEL_FILES,
    TEXT_FILES,
    alpha_record,
    plot_curves,
    run_manifest,
    task_record,
    write_models,
    write_timings,
)
from patcher.stages.build import parse_alpha
from patcher.training.loop import pick_device

CONFIG_FILE = "open_clip_config.json"


@dataclass
class MergeOptions:
    """What `patcher merge` takes."""

    runs: list[Path]
    out: Path
    support: list[str] = field(default_factory=list)
    tolerance: float = 1.0
    alpha: str = "auto"
    data_dir: Path | None = None
    download: bool = False
    device: str = "auto"
    eval_batch_size: int = 256
    data: DataOptions = field(default_factory=DataOptions)


def check_compatible(runs: list[Run]) -> dict[str, Any]:
    """The shared open_clip config; PatcherError when base weights, architecture or preprocessing differ."""
    if len(runs) < 2:
        raise PatcherError("merge needs at least two runs")
    first = runs[0]
    config = json.loads(first.verified_file(CONFIG_FILE).read_text())
    for run in runs[1:]:
        if run.manifest["model"]["weights_sha256"] != first.manifest["model"]["weights_sha256"]:
            raise PatcherError(f"{run.path} was built from different base model weights than {first.path} "
                               "(weights_sha256 differ): only runs of one base model can be merged")
        other = json.loads(run.verified_file(CONFIG_FILE).read_text())
        if other["model_cfg"] != config["model_cfg"]:
            raise PatcherError(f"{run.path} and {first.path} have different architectures (open_clip configs "
                               "differ): only runs of one architecture can be merged")
        if run.manifest["model"]["preprocess"] != first.manifest["model"]["preprocess"]:
            raise PatcherError(f"{run.path} and {first.path} preprocess images differently: rebuild one of them")
    return config


def _classifier(run: Run, kind: str) -> tuple[State, dict[str, torch.Tensor]]:
    return split_classifier_state(load_file(str(run.verified_file(MODEL_FILES[kind]))))


def finetuned_state(run: Run) -> State:
    """What the run's method trained, at its fine-tuned value: encoder, probed heads, text tower."""
    encoder, heads = _classifier(run, "finetuned")
    method = run.manifest.get("method", {})
    state = prefixed(VISUAL_PREFIX, encoder)
    state.update(prefixed(HEAD_PREFIX, {task: heads[task] for task in method.get("head_tasks", [])}))
    if run.manifest.get("text_tower", {}).get("trained"):
        state.update(prefixed(TEXT_PREFIX, load_file(str(run.verified_file(TEXT_FILES["finetuned"])))))
    return state


def _tasks(runs: list[Run], extra_support: list[str]) -> tuple[list[str], list[str]]:
    patch = list(dict.fromkeys(task for run in runs for task in run.manifest["patch_tasks"]))
    support = [t for run in runs for t in run.manifest["support_tasks"]] + list(extra_support)
    return patch, [t for t in dict.fromkeys(support) if t not in patch]


def _base_model(runs: list[Run], config: dict[str, Any], needs_text: bool, device: str) -> LoadedModel:
    model = runs[0].manifest["model"]
    if needs_text:
        loaded = load_clip(model["name"], model["pretrained"], model.get("image_size"), device=device)
        if loaded.weights_sha256 != model["weights_sha256"]:
            raise PatcherError(f"{model['name']} ({model['pretrained']}) no longer has the weights these runs were "
                               "built from (weights_sha256 differs): text-tower runs and new supported tasks need it")
        return loaded
    built = build_from_config(config).to(device)
    return LoadedModel(built, None, model["name"], model["pretrained"], config["model_cfg"],  # type: ignore[arg-type]
                       config.get("preprocess_cfg", {}), model["weights_sha256"])


def merge_runs(options: MergeOptions) -> Path:
    """Merge the runs, choose the coefficient, write the merged run directory; return its path."""
    started = time.perf_counter()
    out = Path(options.out)
    if out.exists():
        raise PatcherError(f"{out} already exists: pass another --out or remove it")
    if options.tolerance < 0:
        raise PatcherError(f"--tolerance {options.tolerance:g} is negative: pass points of accuracy, e.g. 1")
    fixed_alpha = parse_alpha(options.alpha)
    runs = [load_run(path) for path in options.runs]
    config = check_compatible(runs)
    device = pick_device(options.device)
    patch, support = _tasks(runs, options.support)
    known = {t for run in runs for t in run.manifest["tasks"]}
    text_runs = [run for run in runs if run.manifest.get("text_tower", {}).get("trained")]
    loaded = _base_model(runs, config, bool(text_runs) or bool(set(support) - known), device)

    zeroshot_visual = _classifier(runs[0], "zeroshot")[0]
    for run in runs[1:]:
        if state_dict_digest(_classifier(run, "zeroshot")[0]) != state_dict_digest(zeroshot_visual):
            raise PatcherError(f"{run.path} has another zero-shot encoder than {runs[0].path}: different base models")
    loaded.model.visual.load_state_dict(zeroshot_visual)
    tasks = _load_tasks(runs, [*patch, *support])
    heads = _zeroshot_heads(runs, tasks, loaded, device)

    splits = prepare_splits([], list(tasks.values()), loaded.preprocess_cfg, options.data, options.data_dir,
                            options.download, device)
    session = Session(loaded, tasks, heads, splits, device, options.eval_batch_size)
    base, *finetuned = session.complete(session.zeroshot, *(finetuned_state(run) for run in runs))
    path = task_arithmetic(base, finetuned)
    selection = session.select(path, AlphaRule(patch, support, options.tolerance), "grid", fixed_alpha,
                               description="choosing the task-vector coefficient")
    if selection.warning:
        console.print(f"[yellow]warning:[/] {selection.warning}")
    states = {"zeroshot": session.zeroshot, "finetuned": path(1.0), "patched": path(selection.alpha)}
    alphas = {"zeroshot": 0.0, "finetuned": 1.0, "patched": selection.alpha}
    test_accuracy = {kind: session.accuracy(state, splits.test) for kind, state in states.items()}

    with output_directory(out) as staging:  # locked, stale partials cleaned, write faults as one error
        text_files = write_models(staging, session.resolver, states, alphas)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        plot_curves(staging, selection, patch, support, options.tolerance,
                    f"merged {', '.join(patch)}: held-out accuracy against the coefficient")
        manifest = _manifest(out.name, options, runs, tasks, patch, support, splits, selection, fixed_alpha,
                             test_accuracy, text_files, device, staging)
        write_timings(staging, {"total": time.perf_counter() - started})
        write_json(staging / MANIFEST, manifest)
    return out


def _load_tasks(runs: list[Run], names: list[str]) -> dict[str, Task]:
    tasks = {}
    for name in names:
        task = get_task(name)
        for run in runs:
            recorded = run.manifest["tasks"].get(name)
            if recorded is not None and list(recorded["classnames"]) != list(task.classnames):
                raise PatcherError(f"{name}'s class names changed since {run.path} was built: rebuild that run")
        tasks[name] = task
    return tasks


def _zeroshot_heads(runs: list[Run], tasks: dict[str, Task], loaded: LoadedModel, device: str) -> dict:
    heads: dict[str, torch.Tensor] = {}
    for run in runs:
        stored = _classifier(run, "zeroshot")[1]
        heads.update({task: head for task, head in stored.items() if task in tasks and task not in heads})
    for name, task in tasks.items():
        if name not in heads:
            heads[name] = zero_shot_head(loaded, list(task.classnames), list(task.templates), device)
    return {name: heads[name] for name in tasks}


def _manifest(name: str, options: MergeOptions, runs: list[Run], tasks: dict[str, Task], patch: list[str],
              support: list[str], splits: Any, selection: Any, fixed_alpha: float | None,
              test_accuracy: dict[str, dict[str, float]], text_files: dict[str, str], device: str,
              staging: Path) -> dict[str, Any]:
    def sizes(task: str) -> dict[str, int]:
        recorded = next((run.manifest["tasks"][task]["sizes"] for run in runs
                         if task in run.manifest["tasks"] and task in run.manifest["patch_tasks"]), {})
        train = {"train": recorded["train"]} if "train" in recorded else {}
        return {**train, "val": len(splits.val[task]), "test": len(splits.test[task])}

    methods = list(dict.fromkeys(run.manifest.get("method", {}).get("name", "ft") for run in runs))
    trains = list(dict.fromkeys(part for run in runs for part in run.manifest.get("method", {}).get("trains", [])))
    head_tasks = list(dict.fromkeys(t for run in runs for t in run.manifest.get("method", {}).get("head_tasks", [])))
    sources = [{"name": run.name, "path": str(run.path), "manifest_sha256": run.manifest_sha256,
                "method": run.manifest.get("method"), "patch_tasks": run.manifest["patch_tasks"],
                "alpha": run.manifest["alpha"]["chosen"]} for run in runs]
    alpha = alpha_record(selection, "auto" if fixed_alpha is None else "fixed",
                         "grid" if fixed_alpha is None else "fixed", options.tolerance, selection.curve[0.0])
    alpha["parameter"] = "task-vector scaling coefficient"
    fingerprint = {"runs": [s["manifest_sha256"] for s in sources], "support": options.support,
                   "tolerance": options.tolerance, "alpha": options.alpha}
    method = {"name": methods[0] if len(methods) == 1 else "+".join(methods),
              "params": {s["name"]: (s["method"] or {}).get("params", {}) for s in sources},
              "trains": trains, "head_tasks": head_tasks, "reference": "task arithmetic (Ilharco et al., 2023)"}
    training = {"merged": True, "device": device,
                "total_steps": sum(run.manifest.get("training", {}).get("total_steps",
                                   run.manifest.get("training", {}).get("steps", 0)) for run in runs)}
    task_records = {**{t: task_record(tasks[t], "patch", sizes(t)) for t in patch},
                    **{t: task_record(tasks[t], "support", sizes(t)) for t in support}}
    return run_manifest(staging, name, options_sha256(fingerprint), runs[0].manifest["model"], task_records, method,
                        {"strategy": "parallel", "merged_runs": sources}, training, alpha, test_accuracy, text_files)


__all__ = ["MergeOptions", "check_compatible", "finetuned_state", "merge_runs"]
