"""`patcher build`: fine-tune with a method, interpolate with the zero-shot weights, choose alpha, write a run.

Read top to bottom, `Build.run`: check the options, join the process group under torchrun, load the model, find
and prepare every split, compute zero-shot heads, run the patching strategy (`patching/strategies.py`), test the
three models, and write the run directory (`stages/outputs.py`). Several patch tasks (`--task A,B`) are patched
jointly, sequentially or in parallel; the run then carries one encoder that serves every task's head.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from patcher.base import distributed
from patcher.base.errors import PatcherError
from patcher.base.progress import console, make_progress
from patcher.base.staging import Resume, Staging, staged_output
from patcher.data.metrics import Scores
from patcher.data.options import DataOptions
from patcher.data.prepared_splits import Splits, SplitTasks, prepare_splits
from patcher.data.shots import FewShot
from patcher.data.tasks import Task, get_task, short_name
from patcher.models import LoadedModel, load_clip
from patcher.models.heads import zero_shot_head
from patcher.patching.alpha import SEARCHES, parse_alpha, parse_support
from patcher.patching.merge_search import MergeSpec
from patcher.patching.session import Session
from patcher.patching.strategies import STRATEGIES, Outcome, Plan
from patcher.runs.layout import CHECKPOINTS, TRAIN_LOG
from patcher.runs.manifest import (
    BaseModel,
    DataRecord,
    MethodRecord,
    Preprocess,
    TaskRecord,
    TrainingRecord,
    heldout_evaluations,
    options_sha256,
)
from patcher.stages.outputs import RunContents, write_run
from patcher.training.config import TrainConfig
from patcher.training.loop import pick_device, precision_name
from patcher.training.methods import get_method, params_dict, parse_params, train_config
from patcher.training.reporting import Reporter, check_reporters, open_reporter

__all__ = ["BuildOptions", "build", "default_out"]


@dataclass
class BuildOptions:
    """Everything `patcher build` takes; `train_config` None means the method's defaults (PAINT's for `ft`)."""

    task: str  # one patch task, or several separated by commas
    support: list[str] = field(default_factory=list)  # "name" or "name:points" (its own tolerance)
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    image_size: int | None = None
    method: str = "ft"
    method_params: dict[str, Any] = field(default_factory=dict)
    multi: str | None = None  # joint | sequential | parallel; joint when several tasks and none is given
    alpha: str = "auto"
    tolerance: float = 1.0
    search: str = "golden"
    train_config: TrainConfig | None = None
    epochs: float | None = None
    data_dir: Path | None = None
    download: bool = False
    device: str = "auto"
    out: Path | None = None
    resume: bool = False
    eval_batch_size: int = 256
    data: DataOptions = field(default_factory=DataOptions)
    monitor: list[str] = field(default_factory=list)  # tasks measured at every alpha and on test, never judged
    merge: MergeSpec = field(default_factory=MergeSpec)  # --multi parallel: the merge method and its bound

    def __post_init__(self) -> None:
        if self.train_config is None:  # the one place the method's defaults fill in what was not given
            self.train_config = train_config(self.method)

    @property
    def patch_tasks(self) -> list[str]:
        """The patch tasks named by `task`, in order."""
        return [name.strip() for name in self.task.split(",") if name.strip()]

    @property
    def strategy(self) -> str:
        """The multi-task strategy (joint for a single patch task)."""
        return self.multi or "joint"

    @property
    def hyperparameters(self) -> TrainConfig:
        """The main stage's hyperparameters (filled by __post_init__)."""
        assert self.train_config is not None
        return self.train_config

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the result: a `--resume` must match them exactly."""
        data = asdict(self)
        for key in ("out", "resume", "data_dir", "download", "eval_batch_size", "train_config"):
            data.pop(key)
        data["data"] = self.data.deciding()  # workers and where pixels are kept do not change results
        data["finetune"] = self.hyperparameters.hyperparameters()
        if not self.monitor:
            data.pop("monitor")  # a build without monitored tasks keeps the fingerprint builds had before them
        if self.merge == MergeSpec():
            data.pop("merge")  # likewise a parallel build with task arithmetic and no retained bound
        return json.loads(json.dumps(data, default=str))


def default_out(options: BuildOptions) -> Path:
    """runs/<task[+task...]>-<method>[-<strategy>]-<timestamp>."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tasks = "+".join(short_name(name) for name in options.patch_tasks)
    strategy = f"-{options.strategy}" if len(options.patch_tasks) > 1 else ""
    return Path("runs") / f"{tasks}-{options.method}{strategy}-{stamp}"


@dataclass(frozen=True)
class Checked:
    """The options, checked: the tasks, the fixed alpha (if any), the method's parameters, each supported task's
    tolerance, and the monitored tasks."""

    patch: list[Task]
    support: list[Task]
    fixed_alpha: float | None
    params: Any
    tolerances: dict[str, float] = field(default_factory=dict)
    monitor: list[Task] = field(default_factory=list)

    @property
    def tasks(self) -> dict[str, Task]:
        """Every task of the run: patch tasks first, then supported, then monitored ones."""
        return {task.name: task for task in [*self.patch, *self.support, *self.monitor]}


def check_options(options: BuildOptions) -> Checked:
    """PatcherError, before any work, for options that cannot build a run."""
    method = get_method(options.method)
    params = parse_params(method, options.method_params)
    SEARCHES.entry(options.search)  # an unknown name is one error line naming the registered ones
    if options.multi is not None:
        STRATEGIES.entry(options.multi)
    if options.tolerance < 0:
        raise PatcherError(f"--tolerance {options.tolerance:g} is negative: pass points of accuracy, e.g. 1")
    options.merge.check()
    if options.merge != MergeSpec(seed=options.merge.seed) and options.strategy != "parallel":
        raise PatcherError("--merge-method, --merge-param and --min-retained merge the task vectors of --multi "
                           "parallel: add --multi parallel (or drop them)")
    names = options.patch_tasks
    if not names:
        raise PatcherError("--task is empty: name the task to patch")
    if len(set(names)) != len(names):
        raise PatcherError(f"--task {options.task!r} names a task twice: list each patch task once")
    if options.multi is not None and len(names) < 2:
        raise PatcherError(f"--multi {options.multi} combines several patch tasks: pass --task A,B (or drop --multi)")
    fixed_alpha = parse_alpha(options.alpha)
    support_names, tolerances = parse_support(options.support, options.tolerance)
    patch = [get_task(name) for name in names]
    for task in patch:
        if not task.trainable:
            raise PatcherError(f"{task.name} is an evaluation set with no training images: pass it as --support or "
                               "--monitor, and patch a task that has a train split")
    support = [get_task(name) for name in support_names]
    monitor = [get_task(name) for name in options.monitor]
    tolerances = {task.name: tolerances[name] for name, task in zip(support_names, support, strict=True)}
    for name in support_names:
        if name in names:
            raise PatcherError(f"{name} is both the patch task and a supported task: list it once")
    if len(set(options.monitor)) != len(options.monitor):
        raise PatcherError(f"--monitor {','.join(options.monitor)} names a task twice: list each monitored task once")
    for name in options.monitor:
        if name in names or name in support_names:
            raise PatcherError(f"{name} is monitored and also patched or supported: give each task one role")
    named = [task.name for task in (*patch, *support, *monitor)]
    if len(set(named)) != len(named):
        twice = sorted({name for name in named if named.count(name) > 1})
        raise PatcherError(f"two of the tasks are named {', '.join(twice)}: give one of them another name "
                           "(--task-name, or NAME=folder:PATH)")
    options.hyperparameters.check()
    check_reporters(options.hyperparameters.report_to)
    if options.resume and options.out is None:
        raise PatcherError("--resume needs the --out of the interrupted build")
    for task in (*patch, *support, *monitor):
        if "val" in task.parts:
            console.print(f"{task.name}: alpha is chosen on its own val part ({task.source})", soft_wrap=True)
    return Checked(patch, support, fixed_alpha, params, tolerances, monitor)


def base_model(loaded: LoadedModel, image_size: int | None) -> BaseModel:
    """The manifest's `model` section: the base model a run starts from."""
    return BaseModel(loaded.name, loaded.pretrained, image_size, loaded.weights_sha256, loaded.embed_dim,
                     Preprocess.from_open_clip(loaded.preprocess_cfg))


def task_records(checked: Checked, splits: Splits) -> dict[str, TaskRecord]:
    """The manifest's `tasks` section: role, class names, templates and split sizes, patch tasks first."""
    def record(task: Task, role: str) -> TaskRecord:
        sizes = {"val": len(splits.val[task.name]), "test": len(splits.test[task.name])}
        if task.name in splits.train:
            sizes = {"train": len(splits.train[task.name]), **sizes}
        return TaskRecord(role=role, classnames=task.classnames, templates=task.templates, sizes=sizes,
                          labels=task.labels, column_labels=task.column_labels, source=task.source)

    return {**{t.name: record(t, "patch") for t in checked.patch},
            **{t.name: record(t, "support") for t in checked.support},
            **{t.name: record(t, "monitor") for t in checked.monitor}}


def task_head(loaded: LoadedModel, task: Task, device: str, parent: Task | None = None) -> torch.Tensor:
    """A task's zero-shot head: its own, or the columns of another task's it is scored with (ImageNet-R's are
    ImageNet's 200 columns, so its logits are ImageNet's restricted to them); `parent`: that task, if not the
    registered one."""
    if task.head_from is None:
        return zero_shot_head(loaded, list(task.classnames), list(task.templates), device)
    parent = parent or get_task(task.head_from.parent)
    head = zero_shot_head(loaded, list(parent.classnames), list(parent.templates), device)
    return head[:, list(task.head_from.columns)].contiguous()


class Build:
    """One `patcher build`, its state kept on this object: `run` sets up, patches, tests and writes."""

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        self.checked = check_options(options)
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def run(self) -> Path | None:
        """The run directory, once written (None on ranks other than 0 under torchrun)."""
        options = self.options
        device = distributed.init_from_environment(pick_device(options.device))
        try:
            out = Path(distributed.broadcast(str(options.out or default_out(options))))
            resume = Resume(options.fingerprint(), options.resume)
            # locked, refused if it exists; staging renamed into place on success, removed on failure, kept for
            # --resume when interrupted
            with staged_output(out, resume=resume, writer=distributed.is_main()) as staging:
                torch.manual_seed(options.hyperparameters.seed)  # random-weight models (tests) are reproducible
                loaded = load_clip(options.model, options.pretrained, options.image_size, device=device)
                config = options.hyperparameters
                shots = FewShot(config.shots, config.seed) if config.shots is not None else None
                wanted = SplitTasks(train=self.checked.patch, evaluate=list(self.checked.tasks.values()), shots=shots)
                splits = self._timed("data", lambda: prepare_splits(
                    wanted, loaded.preprocess_cfg, options.data, data_dir=options.data_dir, download=options.download,
                    device=device))
                try:
                    return self._patch_and_write(loaded, splits, staging, device)
                finally:
                    splits.close()
        finally:
            distributed.shutdown()

    def _timed(self, key: str, work: Any) -> Any:
        tick = time.perf_counter()
        result = work()
        self.timings[key] = time.perf_counter() - tick
        return result

    def _patch_and_write(self, loaded: LoadedModel, splits: Splits, staging: Staging, device: str) -> Path | None:
        heads = self._timed("heads", lambda: {name: task_head(loaded, task, device)
                                              for name, task in self.checked.tasks.items()})
        folder = staging.open()  # created (or taken up with --resume) by rank 0, now that the data is found
        distributed.barrier()  # the staging directory (and any checkpoint to resume from) exists for every rank
        session = Session(loaded, self.checked.tasks, heads, splits, device, self.options.eval_batch_size)
        reporter = self.reporter(folder, staging.final.name)
        try:
            outcome = self._timed("finetune_and_alpha", lambda: STRATEGIES.entry(self.options.strategy).builds(
                session, self.plan(splits, folder, reporter)))
            if reporter is not None:
                report_alpha(reporter, outcome)
        finally:
            if reporter is not None:
                reporter.close()
        if outcome.selection.warning and distributed.is_main():
            console.print(f"[yellow]warning:[/] {outcome.selection.warning}")
        tested = self._timed("test", lambda: test_scores(session, outcome))
        if not distributed.is_main():
            return None
        self.timings["total"] = time.perf_counter() - self.started
        write_run(folder, self.contents(staging.final.name, loaded, session, outcome, tested, folder / TRAIN_LOG))
        return staging.final  # staged_output renames the staging directory into place

    def reporter(self, folder: Path, name: str) -> Reporter | None:
        """The curves a person watches (--report-to), written by rank 0 under the run directory."""
        options = self.options
        if not distributed.is_main():
            return None
        return open_reporter(options.hyperparameters.report_to, folder, name,
                             {"method": options.method, "tasks": options.patch_tasks, "model": options.model,
                              **options.hyperparameters.as_dict()})

    def plan(self, splits: Splits, folder: Path, reporter: Reporter | None = None) -> Plan:
        """What the strategy runs: method, tasks, hyperparameters, rule, and where training writes and reports."""
        options, checked = self.options, self.checked
        return Plan(method=get_method(options.method), params=checked.params, patch=[t.name for t in checked.patch],
                    support=[t.name for t in checked.support], train_config=options.hyperparameters,
                    tolerance=options.tolerance, search=options.search, fixed_alpha=checked.fixed_alpha,
                    epochs=options.epochs, train_sizes={name: len(split) for name, split in splits.train.items()},
                    checkpoints=folder / CHECKPOINTS, log=folder / TRAIN_LOG, tolerances=checked.tolerances,
                    on_log=reporter.log_line if reporter is not None else None, merge=options.merge)

    def contents(self, name: str, loaded: LoadedModel, session: Session, outcome: Outcome,
                 tested: dict[str, dict[str, Scores]], train_log: Path) -> RunContents:
        """What the run directory holds (the device and data from the session that patched and tested)."""
        options, method, splits, device = self.options, get_method(self.options.method), session.splits, session.device
        main_stage = {k: v for k, v in outcome.trained[0].stages[-1].items() if k != "stage"}
        training = TrainingRecord(
            **main_stage, epochs=options.epochs, device=device, precision=precision_name(device),
            stages=outcome.stages, total_steps=outcome.total_steps, world_size=distributed.world_size(),
            data=DataRecord(**asdict(options.data), skipped_bad_images=splits.skipped),
            evaluations=heldout_evaluations(train_log))
        method_record = MethodRecord(method.name, params_dict(self.checked.params), list(method.trains),
                                     outcome.trained_heads, method.reference)
        alpha = outcome.alpha_record(self.checked.fixed_alpha is not None, options.search, options.tolerance,
                                     self.checked.tolerances)
        return RunContents(name=name, options_sha256=options_sha256(options.fingerprint()),
                           model=base_model(loaded, options.image_size), open_clip_config=loaded.open_clip_config(),
                           tasks=task_records(self.checked, splits), method=method_record, training=training,
                           outcome=outcome, alpha=alpha, test_accuracy=accuracies_of(tested),
                           resolver=session.resolver, timings=self.timings, test_scores=tested)


def report_alpha(reporter: Reporter, outcome: Outcome) -> None:
    """The alpha curve behind the patched model (and each step's, for a sequential run) to the watched curves."""
    for number, (_, selection) in enumerate(outcome.step_plots(), start=1):
        reporter.alpha_curve(selection.curve, selection.alpha, prefix=f"step{number}/")
    reporter.alpha_curve(outcome.selection.curve, outcome.selection.alpha)


def test_scores(session: Session, outcome: Outcome) -> dict[str, dict[str, Scores]]:
    """Test scores (confusion matrices) of each stored model on every task."""
    results = {}
    with make_progress() as progress:
        bar = progress.add_task("testing", total=len(outcome.states), status="")
        for kind, state in outcome.states.items():
            results[kind] = session.scores(state, session.splits.test)
            progress.advance(bar)
    outcome.record_test(accuracies_of(results))
    return results


def accuracies_of(tested: dict[str, dict[str, Scores]]) -> dict[str, dict[str, float]]:
    """Top-1 accuracy by model and task."""
    return {kind: {task: scores.accuracy for task, scores in by_task.items()} for kind, by_task in tested.items()}


def test(session: Session, outcome: Outcome) -> dict[str, dict[str, float]]:
    """Test accuracy of each stored model on every task."""
    return accuracies_of(test_scores(session, outcome))


def build(options: BuildOptions) -> Path | None:
    """Run the whole build and return the finished run directory (None on ranks other than 0 under torchrun)."""
    return Build(options).run()
