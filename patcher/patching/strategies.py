"""Patching several tasks: joint (one fine-tune on the mixture), sequential (task after task), parallel
(task arithmetic: one scaling coefficient for the sum of task vectors). One task is the joint case.

Each strategy returns its own typed outcome: the three models a run stores (zero-shot, fine-tuned, patched) as
states, the selection behind the patched model, and what the strategy records about itself (its steps, what its
coefficient means, its plots), so the stage that writes the run never asks which strategy ran. What "fine-tuned"
means: joint, the model trained on the mixture; sequential, the last step's fine-tuned model (trained from the
previous patched one); parallel, the zero-shot model plus the full sum of task vectors (coefficient 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from patcher.base.registries import Registered, Registry
from patcher.models.state import State
from patcher.patching.alpha import DEFAULT_GRID, AlphaRule, Selection
from patcher.patching.merge_search import MERGE_GRID, MergeOutcomeParts, MergeSpec, merge_states
from patcher.patching.session import FineTuning, Session, Trained
from patcher.patching.sources import StateVectors
from patcher.patching.task_vectors import interpolate
from patcher.runs.manifest import (
    AlphaRecord,
    FineTuneStep,
    MergedRun,
    MultiRecord,
    SelectionStep,
    curve_points,
)
from patcher.training.config import TrainConfig
from patcher.training.methods import Method


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What to patch and how: method, tasks, hyperparameters, alpha rule, and where training writes."""

    method: type[Method]
    params: Any
    patch: list[str]
    support: list[str]
    train_config: TrainConfig
    tolerance: float = 1.0  # what a supported task may lose, unless `tolerances` names its own
    search: str = "golden"
    fixed_alpha: float | None = None
    epochs: float | None = None  # instead of train_config.steps: epochs over the tasks trained together
    train_sizes: Mapping[str, int] = field(default_factory=dict)  # training images per task, for `epochs`
    checkpoints: Path | None = None
    log: Path | None = None
    tolerances: Mapping[str, float] = field(default_factory=dict)  # per supported task, in points
    on_log: Callable[[dict[str, Any]], None] | None = None  # every training log line (curves a person watches)
    merge: MergeSpec = field(default_factory=MergeSpec)  # the parallel strategy's merge method

    def train_config_for(self, tasks: list[str]) -> TrainConfig:
        """The main stage's hyperparameters for tasks trained together (steps from `epochs` when given)."""
        if self.epochs is None:
            return self.train_config
        items = sum(self.train_sizes[task] for task in tasks)
        return replace(self.train_config, steps=max(1, round(self.epochs * items / self.train_config.batch_size)))

    def fine_tuning(self, tasks: list[str], step_offset: int = 0, label: str = "") -> FineTuning:
        """One fine-tune of this plan's method on `tasks`."""
        return FineTuning(method=self.method, params=self.params, tasks=tasks,
                          train_config=self.train_config_for(tasks), checkpoints=self.checkpoints, log=self.log,
                          step_offset=step_offset, label=label, on_log=self.on_log)

    def rule(self, patch: list[str], reference: Mapping[str, float] | None = None) -> AlphaRule:
        """PAINT's rule for these patch tasks (the plan's supported tasks and tolerance)."""
        return AlphaRule(patch, self.support, self.tolerance, reference, self.tolerances)


@dataclass(kw_only=True)
class Outcome:
    """What a strategy made: the states a run stores, the selection behind the patched model, how it got there."""

    states: dict[str, State]
    selection: Selection
    reference: dict[str, float]  # held-out zero-shot accuracy the rule measured supported tasks against
    trained: list[Trained]
    title: str  # the alpha plot's title
    several_tasks: bool = False

    strategy: ClassVar[str] = "joint"
    parameter: ClassVar[str | None] = None  # what alpha is, where it is not the interpolation weight
    always_grid: ClassVar[bool] = False  # the coefficient is searched over the grid, whatever --search says

    @property
    def alphas(self) -> dict[str, float]:
        """The interpolation weight of each stored model."""
        return {"zeroshot": 0.0, "finetuned": 1.0, "patched": self.selection.alpha}

    @property
    def total_steps(self) -> int:
        """Training steps run over all fine-tunes."""
        return sum(t.steps for t in self.trained)

    @property
    def trained_heads(self) -> list[str]:
        """Tasks whose head was trained as a parameter by any fine-tune."""
        return list(dict.fromkeys(task for t in self.trained for task in t.method.trained_heads()))

    @property
    def stages(self) -> list[dict[str, Any]]:
        """Every training stage run, with its hyperparameters."""
        return [stage for trained in self.trained for stage in trained.stages]

    def steps(self) -> list[SelectionStep] | list[FineTuneStep]:
        """The strategy's steps, as the manifest records them."""
        return []

    def multi_record(self) -> MultiRecord | None:
        """The manifest's `multi` section (None for a single patch task)."""
        return MultiRecord(self.strategy, steps=self.steps()) if self.several_tasks else None

    def alpha_record(self, fixed: bool, search: str, tolerance: float,
                     tolerances: Mapping[str, float] | None = None) -> AlphaRecord:
        """The manifest's `alpha` section (`tolerances`: each supported task's, in points)."""
        selection = self.selection
        return AlphaRecord(
            mode="fixed" if fixed else "auto", chosen=selection.alpha, rule=selection.rule, tolerance=tolerance,
            tolerances=dict(tolerances or {}), search="fixed" if fixed else self.search_used(search),
            evaluations=selection.evaluations, grid=list(self.grid_used()), warning=selection.warning,
            curve=curve_points(selection.curve, selection_metrics(selection)),
            zeroshot_val_accuracy=dict(self.reference), parameter=self.parameter, steps=self.alpha_steps(),
        )

    def alpha_steps(self) -> list[SelectionStep] | None:
        """The per-step selections the `alpha` section repeats (sequential only)."""
        return None

    def search_used(self, search: str) -> str:
        """The search that chose the coefficient (`search` unless the strategy always uses the grid)."""
        return "grid" if self.always_grid else search

    def grid_used(self) -> tuple[float, ...]:
        """The values alpha was chosen among."""
        return DEFAULT_GRID

    def step_plots(self) -> list[tuple[str, Selection]]:
        """(task, selection) of each step that gets its own alpha plot."""
        return []

    def record_test(self, accuracy: Mapping[str, Mapping[str, float]]) -> None:
        """Told the test accuracy of every stored model, by kind and task (a merge reports what it retained)."""


@dataclass(kw_only=True)
class SequentialOutcome(Outcome):
    """Task after task: each step's task and selection."""

    selections: list[tuple[str, Selection]] = field(default_factory=list)

    strategy: ClassVar[str] = "sequential"
    parameter: ClassVar[str | None] = "per-step alpha (chosen = the last step's)"

    def steps(self) -> list[SelectionStep]:
        """Each step's task, alpha, rule and curve."""
        return [SelectionStep(task, s.alpha, s.rule, s.warning, s.evaluations,
                              curve_points(s.curve, selection_metrics(s))) for task, s in self.selections]

    def alpha_steps(self) -> list[SelectionStep]:
        """Every step's selection."""
        return self.steps()

    def step_plots(self) -> list[tuple[str, Selection]]:
        """One plot per step."""
        return list(self.selections)


@dataclass(kw_only=True)
class ParallelOutcome(Outcome):
    """Task vectors added with one coefficient: each fine-tune's task and steps (or the runs merged)."""

    fine_tunes: list[tuple[str, int]] = field(default_factory=list)
    merged_runs: list[MergedRun] | None = None
    merge: MergeOutcomeParts | None = None  # the merge method, its choice and each task's own fine-tune accuracy

    strategy: ClassVar[str] = "parallel"
    parameter: ClassVar[str | None] = "task-vector scaling coefficient"
    always_grid: ClassVar[bool] = True

    def steps(self) -> list[FineTuneStep]:
        """Each task's fine-tune."""
        return [FineTuneStep(task, steps) for task, steps in self.fine_tunes]

    def multi_record(self) -> MultiRecord:
        """The strategy and its fine-tunes, or the runs `patcher merge` combined."""
        record = self.merge.record() if self.merge is not None else None
        if self.merged_runs is not None:
            return MultiRecord(self.strategy, merged_runs=self.merged_runs, merge=record)
        return MultiRecord(self.strategy, steps=self.steps(), merge=record)

    def search_used(self, search: str) -> str:
        """The merge's coefficient search (the grid unless the merge asked for golden-section)."""
        return self.merge.spec.search if self.merge is not None else "grid"

    def grid_used(self) -> tuple[float, ...]:
        """The merge's coefficient grid (finer near 0, where a sum of several task vectors already moves far)."""
        return MERGE_GRID if self.merge is not None else DEFAULT_GRID

    def record_test(self, accuracy: Mapping[str, Mapping[str, float]]) -> None:
        """The patched model's test accuracy, for the share of each task's own fine-tune it retains."""
        if self.merge is not None:
            self.merge.tested = dict(accuracy["patched"])


def selection_metrics(selection: Selection) -> dict[float, dict[str, dict[str, float]]]:
    """{alpha: {task: {metric: value}}} of every alpha a selection evaluated (empty where no scores were kept)."""
    return {alpha: {task: scores.metrics() for task, scores in by_task.items()}
            for alpha, by_task in selection.scores.items()}


def joint(session: Session, plan: Plan) -> Outcome:
    """One fine-tune on the balanced mixture of every patch task, then interpolation with the zero-shot model."""
    zeroshot = session.zeroshot
    trained = session.fine_tune(zeroshot, plan.fine_tuning(plan.patch))
    base, finetuned = session.complete(zeroshot, trained.state)
    selection = session.select(lambda a: interpolate(base, finetuned, a), plan.rule(plan.patch), plan.search,
                               plan.fixed_alpha)
    states = {"zeroshot": zeroshot, "finetuned": finetuned, "patched": interpolate(base, finetuned, selection.alpha)}
    return Outcome(states=states, selection=selection, reference=selection.curve[0.0], trained=[trained],
                   title=_title(plan, "alpha"), several_tasks=len(plan.patch) > 1)


def sequential(session: Session, plan: Plan) -> SequentialOutcome:
    """Patch task after task, each fine-tune starting from the previous patched model.

    Alpha is chosen per step for the mean held-out accuracy over the tasks patched so far, with supported
    tasks measured against the original zero-shot model (`AlphaRule.reference`), not the previous step.
    """
    zeroshot = session.zeroshot
    reference = session.accuracy(zeroshot, session.splits.val)
    current, finetuned = zeroshot, zeroshot
    trained_all: list[Trained] = []
    selections: list[tuple[str, Selection]] = []
    offset = 0
    for number, task in enumerate(plan.patch):
        trained = session.fine_tune(current, plan.fine_tuning([task], offset, f"{number}-"))
        offset += trained.steps
        start, finetuned = session.complete(current, trained.state)
        seen = plan.patch[: number + 1]
        selection = session.select(lambda a, s=start, f=finetuned: interpolate(s, f, a), plan.rule(seen, reference),
                                   plan.search, plan.fixed_alpha,
                                   f"step {number + 1}/{len(plan.patch)} ({task}): choosing alpha")
        current = interpolate(start, finetuned, selection.alpha)
        trained_all.append(trained)
        selections.append((task, selection))
    states = {"zeroshot": zeroshot, "finetuned": finetuned, "patched": current}
    return SequentialOutcome(states=states, selection=selections[-1][1], reference=reference, trained=trained_all,
                             title=_title(plan, "alpha"), several_tasks=True, selections=selections)


def parallel(session: Session, plan: Plan) -> ParallelOutcome:
    """Fine-tune each task from the zero-shot model; merge the task vectors with `plan.merge`'s method.

    Task arithmetic (the default): zero-shot + coefficient * the sum of task vectors, the coefficient searched over
    PAINT's grid 0, 0.1, ..., 1 refined below 0.2 (MERGE_GRID; Ilharco et al., 2023) with PAINT's rule, the patch
    accuracy being the mean over the patch tasks; other methods (TIES, DARE, ...) also search their parameters
    (`patching/merge_search.py`).
    """
    zeroshot = session.zeroshot
    trained_all: list[Trained] = []
    offset = 0
    for number, task in enumerate(plan.patch):
        trained = session.fine_tune(zeroshot, plan.fine_tuning([task], offset, f"{number}-"))
        offset += trained.steps
        trained_all.append(trained)
    base, *finetuned = session.complete(zeroshot, *(t.state for t in trained_all))
    own = [((lambda s=state: s), [task]) for state, task in zip(finetuned, plan.patch, strict=True)]
    states, selection, parts = merge_states(session, plan.merge, StateVectors(base, finetuned),
                                            plan.rule(plan.patch), own, plan.fixed_alpha)
    fine_tunes = [(task, trained.steps) for task, trained in zip(plan.patch, trained_all, strict=True)]
    return ParallelOutcome(states=states, selection=selection, reference=selection.curve[0.0], trained=trained_all,
                           title=_title(plan, "the coefficient"), several_tasks=True, fine_tunes=fine_tunes,
                           merge=parts)


def _title(plan: Plan, parameter: str) -> str:
    return f"{', '.join(plan.patch)}: held-out accuracy against {parameter}"


PAINT = "Ilharco et al., Patching open-vocabulary models by interpolating weights (PAINT), NeurIPS 2022"
Strategy = Callable[[Session, Plan], Outcome]
STRATEGIES: Registry[Registered[Strategy]] = Registry("--multi", [
    Registered(name="joint", builds=joint, reference=PAINT,
          summary="one fine-tune on the balanced mixture of every patch task, then interpolation"),
    Registered(name="sequential", builds=sequential, reference=PAINT,
          summary="task after task, each fine-tune from the previous patched model, alpha chosen per step"),
    Registered(name="parallel", builds=parallel, reference=f"{PAINT}; Ilharco et al., Editing models with task "
          "arithmetic, ICLR 2023", summary="each task fine-tuned from the zero-shot model, the task vectors merged "
          "(--merge-method)"),
])
