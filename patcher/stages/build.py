"""`patcher build`: fine-tune with a method, interpolate with the zero-shot weights, choose alpha, write a run.

Several patch tasks (`--task A,B`) are patched jointly, sequentially or in parallel (`patcher.patching.strategies`);
the run then carries one encoder that serves every patch and supported task's head from one pass.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from patcher import distributed
from patcher.data.loading import DataOptions, Splits, prepare_splits
from patcher.data.tasks import Task, get_task
from patcher.errors import PatcherError
from patcher.models import LoadedModel, load_clip
from patcher.models.heads import zero_shot_head
from patcher.patching.alpha import SEARCHES, Selection
from patcher.patching.session import Session
from patcher.patching.strategies import STRATEGIES, Outcome, Plan
from patcher.progress import console, make_progress
from patcher.runs.manifest import MANIFEST, options_sha256
from patcher.runs.store import RunStaging, run_staging, write_json
from patcher.runs.writer import (
    MODEL_FILES,
    alpha_record,
    base_model_record,
    plot_curves,
    run_manifest,
    task_record,
    write_models,
    write_timings,
)
from patcher.training.loop import TrainConfig, pick_device, precision_name
from patcher.training.methods import get_method, params_dict, parse_params, train_config

__all__ = ["MODEL_FILES", "BuildOptions", "build", "default_out", "parse_alpha"]


@dataclass
class BuildOptions:
    """Everything `patcher build` takes; training defaults are the method's (PAINT's for `ft`)."""

    task: str  # one patch task, or several separated by commas
    support: list[str] = field(default_factory=list)
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    image_size: int | None = None
    method: str = "ft"
    method_params: dict[str, Any] = field(default_factory=dict)
    multi: str | None = None  # joint | sequential | parallel; joint when several tasks and none is given
    alpha: str = "auto"
    tolerance: float = 1.0
    search: str = "golden"
    finetune: TrainConfig | None = None  # None: the method's defaults (`patcher.training.methods.train_config`)
    epochs: float | None = None
    data_dir: Path | None = None
    download: bool = False
    device: str = "auto"
    out: Path | None = None
    resume: bool = False
    eval_batch_size: int = 256
    data: DataOptions = field(default_factory=DataOptions)

    @property
    def patch_tasks(self) -> list[str]:
        """The patch tasks named by `task`, in order."""
        return [name.strip() for name in self.task.split(",") if name.strip()]

    @property
    def strategy(self) -> str | None:
        """The multi-task strategy, None for a single patch task."""
        return (self.multi or "joint") if len(self.patch_tasks) > 1 else None

    def training(self) -> TrainConfig:
        """The main stage's hyperparameters: the given ones, else the method's defaults."""
        return self.finetune if self.finetune is not None else train_config(self.method)

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the result: a `--resume` must match them exactly."""
        data = asdict(self)
        for key in ("out", "resume", "data_dir", "download", "eval_batch_size"):
            data.pop(key)
        # workers and where pixels are kept do not change results; augmentation and left-out files do
        data["data"] = {"augment": self.data.augment, "skip_bad_images": self.data.skip_bad_images}
        data["finetune"] = {k: v for k, v in self.training().as_dict().items()
                            if k not in ("checkpoint_every", "log_every")}
        return json.loads(json.dumps(data, default=str))


def parse_alpha(alpha: str) -> float | None:
    """None for 'auto', else a float in [0, 1]; anything else is refused."""
    if str(alpha).strip().lower() == "auto":
        return None
    try:
        value = float(alpha)
    except ValueError:
        message = f"--alpha {alpha!r} is neither 'auto' nor a number: pass auto or a value in [0, 1]"
        raise PatcherError(message) from None
    if not 0.0 <= value <= 1.0:
        raise PatcherError(f"--alpha {value:g} is outside [0, 1]: 0 keeps the zero-shot model, 1 the fine-tuned one")
    return value


def default_out(options: BuildOptions) -> Path:
    """runs/<task[+task...]>-<method>[-<strategy>]-<timestamp>."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tasks = "+".join(name.replace("/", "_").replace(":", "_") for name in options.patch_tasks)
    strategy = f"-{options.strategy}" if options.strategy else ""
    return Path("runs") / f"{tasks}-{options.method}{strategy}-{stamp}"


@dataclass
class _Checked:
    patch: list[Task]
    support: list[Task]
    alpha: float | None
    params: Any


def _validate(options: BuildOptions) -> _Checked:
    method = get_method(options.method)
    params = parse_params(method, options.method_params)
    if options.search not in SEARCHES:
        raise PatcherError(f"unknown --search {options.search!r}: use one of {', '.join(SEARCHES)}")
    if options.multi is not None and options.multi not in STRATEGIES:
        raise PatcherError(f"unknown --multi {options.multi!r}: use one of {', '.join(STRATEGIES)}")
    if options.tolerance < 0:
        raise PatcherError(f"--tolerance {options.tolerance:g} is negative: pass points of accuracy, e.g. 1")
    names = options.patch_tasks
    if not names:
        raise PatcherError("--task is empty: name the task to patch")
    if len(set(names)) != len(names):
        raise PatcherError(f"--task {options.task!r} names a task twice: list each patch task once")
    if options.multi is not None and len(names) < 2:
        raise PatcherError(f"--multi {options.multi} combines several patch tasks: pass --task A,B (or drop --multi)")
    alpha = parse_alpha(options.alpha)
    patch = [get_task(name) for name in names]
    support = [get_task(name) for name in options.support]
    for name in options.support:
        if name in names:
            raise PatcherError(f"{name} is both the patch task and a supported task: list it once")
    cfg = options.training()
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise PatcherError("--steps, --batch-size and --lr must be positive")
    return _Checked(patch, support, alpha, params)


def _config_for(options: BuildOptions, splits: Splits) -> Any:
    base = options.training()

    def config(tasks: list[str]) -> TrainConfig:
        if options.epochs is None:
            return base
        items = sum(len(splits.train[t]) for t in tasks)
        return TrainConfig(**{**base.as_dict(), "steps": max(1, round(options.epochs * items / base.batch_size))})

    return config


def build(options: BuildOptions) -> Path | None:
    """Run the whole build and return the finished run directory (None on ranks other than 0 under torchrun)."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    checked = _validate(options)
    if options.resume and options.out is None:
        raise PatcherError("--resume needs the --out of the interrupted build")
    device = distributed.init_from_environment(pick_device(options.device))
    try:
        out = Path(distributed.broadcast(str(options.out or default_out(options))))
        # locked for this build, refused if it exists; staging renamed into place on success, removed on failure
        with run_staging(out, options.fingerprint(), options.resume, writer=distributed.is_main()) as output:
            torch.manual_seed(options.training().seed)  # random-weight models (tests, ablations) are reproducible
            loaded = load_clip(options.model, options.pretrained, options.image_size, device=device)

            tick = time.perf_counter()
            tasks = {task.name: task for task in [*checked.patch, *checked.support]}
            splits = prepare_splits(checked.patch, list(tasks.values()), loaded.preprocess_cfg, options.data,
                                    options.data_dir, options.download, device)
            timings["data"] = time.perf_counter() - tick
            try:
                return _patch_and_write(options, checked, loaded, tasks, splits, output, device, started, timings)
            finally:
                splits.close()
    finally:
        distributed.shutdown()


def _patch_and_write(options: BuildOptions, checked: _Checked, loaded: LoadedModel, tasks: dict[str, Task],
                     splits: Splits, output: RunStaging, device: str, started: float,
                     timings: dict[str, float]) -> Path | None:
    main, out = distributed.is_main(), output.out
    tick = time.perf_counter()
    heads = {name: zero_shot_head(loaded, list(t.classnames), list(t.templates), device) for name, t in tasks.items()}
    timings["heads"] = time.perf_counter() - tick
    staging = output.open()  # created (or taken up with --resume) by rank 0, now that the data is found
    distributed.barrier()  # the staging directory (and any checkpoint to resume from) exists for every rank

    session = Session(loaded, tasks, heads, splits, device, options.eval_batch_size)
    patch_names = [task.name for task in checked.patch]
    support_names = [task.name for task in checked.support]
    plan = Plan(get_method(options.method), checked.params, patch_names, support_names, _config_for(options, splits),
                options.tolerance, options.search, checked.alpha, staging / "checkpoints", staging / "train.log")
    tick = time.perf_counter()
    outcome = STRATEGIES[options.strategy or "joint"](session, plan)
    timings["finetune_and_alpha"] = time.perf_counter() - tick
    if outcome.selection.warning and main:
        console.print(f"[yellow]warning:[/] {outcome.selection.warning}")

    tick = time.perf_counter()
    test_accuracy = {}
    with make_progress() as progress:
        bar = progress.add_task("testing", total=len(outcome.states), status="")
        for kind, state in outcome.states.items():
            test_accuracy[kind] = session.accuracy(state, splits.test)
            progress.advance(bar)
    timings["test"] = time.perf_counter() - tick
    if not main:
        return None

    text_files = write_models(staging, session.resolver, outcome.states, outcome.alphas)
    (staging / "open_clip_config.json").write_text(json.dumps(loaded.open_clip_config(), indent=2) + "\n")
    steps = [(s["task"], _selection(s)) for s in outcome.steps] if options.strategy == "sequential" else None
    against = "the coefficient" if options.strategy == "parallel" else "alpha"
    plot_curves(staging, outcome.selection, patch_names, support_names, options.tolerance,
                f"{', '.join(patch_names)}: held-out accuracy against {against}", outcome.reference, steps)
    timings["total"] = time.perf_counter() - started
    manifest = _manifest(out.name, options, checked, loaded, splits, outcome, test_accuracy, text_files, device,
                         staging)
    write_timings(staging, timings)
    write_json(staging / MANIFEST, manifest)  # last: a staging directory with a manifest is complete
    return out  # run_staging renames the staging directory into place


def _selection(step: dict[str, Any]) -> Selection:
    curve = {point["alpha"]: point["val_accuracy"] for point in step["curve"]}
    return Selection(alpha=step["alpha"], rule=step["rule"], curve=curve, warning=step["warning"])


def _manifest(
    name: str,
    options: BuildOptions,
    checked: _Checked,
    loaded: LoadedModel,
    splits: Splits,
    outcome: Outcome,
    test_accuracy: dict[str, dict[str, float]],
    text_files: dict[str, str],
    device: str,
    staging: Path,
) -> dict[str, Any]:
    def sizes(task: Task) -> dict[str, int]:
        counts = {"val": len(splits.val[task.name]), "test": len(splits.test[task.name])}
        return {"train": len(splits.train[task.name]), **counts} if task.name in splits.train else counts

    method = get_method(options.method)
    parallel = options.strategy == "parallel"
    search = "fixed" if checked.alpha is not None else ("grid" if parallel else options.search)
    alpha = alpha_record(outcome.selection, "auto" if checked.alpha is None else "fixed", search, options.tolerance,
                         outcome.reference)
    if parallel:
        alpha["parameter"] = "task-vector scaling coefficient"
    if options.strategy == "sequential":
        alpha["parameter"] = "per-step alpha (chosen = the last step's)"
        alpha["steps"] = outcome.steps
    stages = [config for trained in outcome.trained for config in trained.configs]
    main_stage = {k: v for k, v in outcome.trained[0].configs[-1].items() if k != "stage"}
    tasks = {**{task.name: task_record(task, "patch", sizes(task)) for task in checked.patch},
             **{task.name: task_record(task, "support", sizes(task)) for task in checked.support}}
    method_section = {"name": method.name, "params": params_dict(checked.params), "trains": list(method.trains),
                      "head_tasks": outcome.trained_heads, "reference": method.reference}
    multi = None if options.strategy is None else {"strategy": options.strategy, "steps": outcome.steps}
    training = {**main_stage, "epochs": options.epochs, "device": device, "precision": precision_name(device),
                "stages": stages, "total_steps": outcome.total_steps, "world_size": distributed.world_size(),
                "data": {**asdict(options.data), "skipped_bad_images": splits.skipped}}
    model = base_model_record(loaded, options.image_size)
    return run_manifest(staging, name, options_sha256(options.fingerprint()), model, tasks, method_section, multi,
                        training, alpha, test_accuracy, text_files)
