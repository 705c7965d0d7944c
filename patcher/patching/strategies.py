"""Patching several tasks: joint (one fine-tune on the mixture), sequential (task after task), parallel
(task arithmetic: one scaling coefficient for the sum of task vectors). One task is the joint case.

Each strategy returns the three models a run stores (zero-shot, fine-tuned, patched) as states, and
the alpha selections it made. What "fine-tuned" means: joint, the model trained on the mixture;
sequential, the last step's fine-tuned model (trained from the previous patched one); parallel, the
zero-shot model plus the full sum of task vectors (coefficient 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.models.state import State
from patcher.patching.alpha import AlphaRule, Selection
from patcher.patching.session import Session, Trained
from patcher.patching.task_vectors import TaskVector, interpolate
from patcher.training.loop import TrainConfig
from patcher.training.methods import Method


@dataclass
class Plan:
    """What to patch and how: method, tasks, alpha rule and where training writes its checkpoints and log."""

    method: type[Method]
    params: Any
    patch: list[str]
    support: list[str]
    config: Callable[[list[str]], TrainConfig]  # tasks trained together -> their main-stage config
    tolerance: float
    search: str
    fixed_alpha: float | None
    checkpoint_dir: Path | None = None
    log_path: Path | None = None

    def rule(self, patch: list[str], reference: Mapping[str, float] | None = None) -> AlphaRule:
        """PAINT's rule for these patch tasks (the plan's supported tasks and tolerance)."""
        return AlphaRule(patch, self.support, self.tolerance, reference)


@dataclass
class Outcome:
    """The stored models' states and alphas, the selection behind the patched model, and per-step records."""

    states: dict[str, State]
    alphas: dict[str, float]
    selection: Selection
    reference: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)
    trained: list[Trained] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        """Training steps run over all fine-tunes."""
        return sum(t.steps for t in self.trained)

    @property
    def trained_heads(self) -> list[str]:
        """Tasks whose head was trained as a parameter by any fine-tune."""
        return list(dict.fromkeys(task for t in self.trained for task in t.method.trained_heads()))


def joint(session: Session, plan: Plan) -> Outcome:
    """One fine-tune on the balanced mixture of every patch task, then interpolation with the zero-shot model."""
    zeroshot = session.zeroshot
    trained = session.fine_tune(plan.method, plan.params, zeroshot, plan.patch, plan.config(plan.patch),
                                plan.checkpoint_dir, plan.log_path)
    base, finetuned = session.complete(zeroshot, trained.state)
    selection = session.select(lambda a: interpolate(base, finetuned, a), plan.rule(plan.patch), plan.search,
                               plan.fixed_alpha)
    states = {"zeroshot": zeroshot, "finetuned": finetuned, "patched": interpolate(base, finetuned, selection.alpha)}
    return Outcome(states, {"zeroshot": 0.0, "finetuned": 1.0, "patched": selection.alpha}, selection,
                   selection.curve[0.0], trained=[trained])


def sequential(session: Session, plan: Plan) -> Outcome:
    """Patch task after task, each fine-tune starting from the previous patched model.

    Alpha is chosen per step for the mean held-out accuracy over the tasks patched so far, with supported
    tasks measured against the original zero-shot model (`AlphaRule.reference`), not the previous step.
    """
    zeroshot = session.zeroshot
    reference = session.accuracy(zeroshot, session.splits.val)
    current: State = zeroshot
    outcome = Outcome({}, {}, Selection(alpha=0.0, rule=""), reference)
    offset = 0
    for number, task in enumerate(plan.patch):
        trained = session.fine_tune(plan.method, plan.params, current, [task], plan.config([task]),
                                    plan.checkpoint_dir, plan.log_path, offset, f"{number}-")
        offset += trained.steps
        start, finetuned = session.complete(current, trained.state)
        seen = plan.patch[: number + 1]
        selection = session.select(lambda a, s=start, f=finetuned: interpolate(s, f, a), plan.rule(seen, reference),
                                   plan.search, plan.fixed_alpha,
                                   f"step {number + 1}/{len(plan.patch)} ({task}): choosing alpha")
        current = interpolate(start, finetuned, selection.alpha)
        outcome.trained.append(trained)
        outcome.steps.append({"task": task, "alpha": selection.alpha, "rule": selection.rule,
                              "warning": selection.warning, "evaluations": selection.evaluations,
                              "curve": _curve(selection)})
        outcome.selection = selection
        outcome.states["finetuned"] = finetuned
    outcome.states = {"zeroshot": zeroshot, "finetuned": outcome.states["finetuned"], "patched": current}
    outcome.alphas = {"zeroshot": 0.0, "finetuned": 1.0, "patched": outcome.selection.alpha}
    return outcome


def parallel(session: Session, plan: Plan) -> Outcome:
    """Fine-tune each task from the zero-shot model; patch with zero-shot + coefficient * sum of task vectors.

    The coefficient is searched over the grid 0, 0.1, ..., 1 (task arithmetic, Ilharco et al., 2023) with
    PAINT's rule, the patch accuracy being the mean over the patch tasks.
    """
    zeroshot = session.zeroshot
    outcome = Outcome({}, {}, Selection(alpha=0.0, rule=""), {})
    offset = 0
    for number, task in enumerate(plan.patch):
        trained = session.fine_tune(plan.method, plan.params, zeroshot, [task], plan.config([task]),
                                    plan.checkpoint_dir, plan.log_path, offset, f"{number}-")
        offset += trained.steps
        outcome.trained.append(trained)
        outcome.steps.append({"task": task, "steps": trained.steps})
    base, *finetuned = session.complete(zeroshot, *(t.state for t in outcome.trained))
    path = task_arithmetic(base, finetuned)
    selection = session.select(path, plan.rule(plan.patch), "grid", plan.fixed_alpha,
                               description="choosing the task-vector coefficient")
    outcome.states = {"zeroshot": zeroshot, "finetuned": path(1.0), "patched": path(selection.alpha)}
    outcome.alphas = {"zeroshot": 0.0, "finetuned": 1.0, "patched": selection.alpha}
    outcome.selection = selection
    outcome.reference = selection.curve[0.0]
    return outcome


def task_arithmetic(base: State, finetuned: list[State]) -> Callable[[float], State]:
    """coefficient -> base + coefficient * sum over i of (finetuned_i - base)."""
    total = sum(TaskVector.from_states(base, state) for state in finetuned)

    def path(coefficient: float) -> State:
        return total.apply_to(base, coefficient)

    return path


def _curve(selection: Selection) -> list[dict[str, Any]]:
    return [{"alpha": a, "val_accuracy": acc} for a, acc in sorted(selection.curve.items())]


STRATEGIES: dict[str, Callable[[Session, Plan], Outcome]] = {
    "joint": joint, "sequential": sequential, "parallel": parallel,
}
