"""Choosing the mixing coefficient alpha on held-out data (PAINT's rule), with few evaluations."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.registries import Registered, Registry

Accuracies = Mapping[str, float]
Evaluate = Callable[[float], Accuracies]

DEFAULT_GRID = tuple(round(i / 10, 1) for i in range(11))


@dataclass
class Selection:
    """The chosen alpha, the rule that chose it, and every evaluation made on the way."""

    alpha: float
    rule: str
    curve: dict[float, dict[str, float]] = field(default_factory=dict)
    warning: str | None = None
    scores: dict[float, dict[str, Any]] = field(default_factory=dict)  # every task's data.metrics.Scores per alpha

    @property
    def evaluations(self) -> int:
        """How many alphas were evaluated."""
        return len(self.curve)


@dataclass(frozen=True)
class AlphaRule:
    """PAINT's rule: the best patch accuracy among the alphas that keep every supported task within tolerance.

    Supported tasks are measured against `reference`, alpha 0's accuracies unless given (sequential patching
    measures them against the original zero-shot model, which is what can leave no alpha qualifying). A supported
    task named in `tolerances` may lose that many points instead of `tolerance`. Tasks neither patched nor
    supported (monitored ones) are measured, never judged.
    """

    patch: Sequence[str]
    support: Sequence[str] = ()
    tolerance: float = 1.0
    reference: Accuracies | None = None
    tolerances: Mapping[str, float] = field(default_factory=dict)

    def tolerance_of(self, task: str) -> float:
        """Points of accuracy this supported task may lose."""
        return self.tolerances.get(task, self.tolerance)

    @property
    def per_task(self) -> bool:
        """Whether some supported task has a tolerance of its own."""
        return any(self.tolerance_of(task) != self.tolerance for task in self.support)

    def describe(self) -> str:
        """The rule in words, as the manifest and the CLI state it."""
        patch = ", ".join(self.patch)
        if not self.support:
            return (f"no supported tasks given: chose the alpha with the highest held-out accuracy on {patch} "
                    "(the smallest such alpha on ties); nothing guards other tasks, pass --support to protect them")
        if self.per_task:
            allowances = ", ".join(f"{task} {self.tolerance_of(task):g}" for task in self.support)
            return (f"maximise held-out accuracy on {patch} subject to every supported task keeping accuracy >= "
                    f"its zero-shot accuracy - its tolerance in points ({allowances})")
        return (f"maximise held-out accuracy on {patch} subject to every supported task "
                f"({', '.join(self.support)}) keeping accuracy >= its zero-shot accuracy - {self.tolerance:g} points")

    def violation(self, accuracy: Accuracies, zeroshot: Accuracies) -> float:
        """Points by which the supported tasks fall below their allowance, summed (0 when the rule holds)."""
        return sum(max(0.0, zeroshot[t] - self.tolerance_of(t) - accuracy[t]) for t in self.support)

    def patch_mean(self, accuracy: Accuracies) -> float:
        """Mean accuracy over the patch tasks."""
        return sum(accuracy[t] for t in self.patch) / len(self.patch)

    def objective(self, accuracy: Accuracies, zeroshot: Accuracies) -> float:
        """Patch accuracy where the rule holds; else below every feasible value, falling with the violation."""
        violation = self.violation(accuracy, zeroshot)
        return self.patch_mean(accuracy) if violation == 0 else -1e6 - violation

    def choose(self, curve: Mapping[float, Accuracies]) -> Selection:
        """Apply the rule to evaluated points; if none qualifies, the best mean over all tasks, with a warning."""
        zeroshot = self.reference if self.reference is not None else curve[0.0]
        full_curve = {a: dict(v) for a, v in sorted(curve.items())}
        feasible = [a for a in curve if self.violation(curve[a], zeroshot) == 0]
        if feasible:
            best = max(sorted(feasible), key=lambda a: self.patch_mean(curve[a]))
            return Selection(alpha=best, rule=self.describe(), curve=full_curve)
        tasks = [*self.patch, *self.support]
        best = max(sorted(curve), key=lambda a: sum(curve[a][t] for t in tasks) / len(tasks))
        within = "its tolerance" if self.per_task else f"{self.tolerance:g} points"
        warning = (f"no alpha keeps every supported task within {within} of zero-shot; "
                   f"chose alpha {best:g}, the best mean accuracy over all tasks")
        rule = self.describe() + "; none qualified, so: best mean over all tasks"
        return Selection(alpha=best, rule=rule, curve=full_curve, warning=warning)


def grid_search(evaluate: Evaluate, rule: AlphaRule, grid: Sequence[float] = DEFAULT_GRID) -> Selection:
    """Evaluate every alpha of the grid (the papers' 11 points) and apply the rule."""
    return rule.choose({float(a): dict(evaluate(float(a))) for a in grid})


def golden_search(evaluate: Evaluate, rule: AlphaRule, grid: Sequence[float] = DEFAULT_GRID) -> Selection:
    """Golden-section search over the grid's indices for the rule's objective, assumed unimodal in alpha.

    Both ends are always evaluated (alpha 0 is the zero-shot baseline the constraint refers to). The
    answer is the grid search's whenever the objective is unimodal on the grid; ties fall to the left.
    """
    grid = sorted(float(a) for a in grid)
    curve: dict[float, dict[str, float]] = {}

    def accuracy(index: int) -> dict[str, float]:
        alpha = grid[index]
        if alpha not in curve:
            curve[alpha] = dict(evaluate(alpha))
        return curve[alpha]

    zeroshot = rule.reference if rule.reference is not None else accuracy(0)
    accuracy(0)

    def score(index: int) -> float:
        return rule.objective(accuracy(index), zeroshot)

    score(len(grid) - 1)
    low, high = 0, len(grid) - 1
    ratio = (5**0.5 - 1) / 2
    while high - low > 2:
        left = high - round((high - low) * ratio)
        right = low + round((high - low) * ratio)
        if left >= right:
            left, right = (low + high) // 2, (low + high) // 2 + 1
        if score(left) >= score(right):
            high = right
        else:
            low = left
    for index in range(low, high + 1):
        score(index)
    return rule.choose(curve)


Search = Callable[..., Selection]  # (evaluate, rule, grid) -> the rule's choice
PAINT = "Ilharco et al., Patching open-vocabulary models by interpolating weights (PAINT), NeurIPS 2022"
SEARCHES: Registry[Registered[Search]] = Registry("--search", [
    Registered(name="golden", builds=golden_search, reference=f"golden-section search (Kiefer, 1953) on {PAINT}'s grid",
          summary="golden-section search over the grid's alphas (fewer evaluations; the grid's answer when the "
                  "objective is unimodal)"),
    Registered(name="grid", builds=grid_search, reference=PAINT,
          summary="every alpha of the grid (the papers' 11 points), then the rule"),
])


def parse_support(entries: Sequence[str], tolerance: float) -> tuple[list[str], dict[str, float]]:
    """Supported task names and each one's tolerance from `--support` entries "name" or "name:points" (a bare
    name takes `tolerance`); PatcherError for a tolerance that is not a number of points >= 0."""
    names, tolerances = [], {}
    for entry in entries:
        name, points = _split_tolerance(entry.strip())
        if points is None:
            tolerances[name] = tolerance
        else:
            try:
                tolerances[name] = float(points)
            except ValueError:
                raise PatcherError(f"--support {entry!r}: {points!r} is not a number of points; write task:points, "
                                   "e.g. imagenet:0.5") from None
            if not tolerances[name] >= 0:
                raise PatcherError(f"--support {entry!r}: a tolerance is points of accuracy >= 0, e.g. imagenet:0.5")
        if name in names:
            raise PatcherError(f"--support names {name} twice: list each supported task once")
        names.append(name)
    return names, tolerances


USER_DATASET = re.compile(r"(?:[A-Za-z][A-Za-z0-9_-]*=)?(?:folder|csv|wds):")  # a user's dataset spec (user_data)


def _split_tolerance(entry: str) -> tuple[str, str | None]:
    """("name", "points") for "name:points"; ("folder:PATH", None) for a folder task without a tolerance."""
    name, separator, points = entry.rpartition(":")
    if not separator or not name:
        return entry, None
    if USER_DATASET.match(entry) and not _is_number(points):  # "folder:PATH" alone; its PATH may hold colons
        return entry, None
    return name, points


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_alpha(alpha: str) -> float | None:
    """None for 'auto', else a float in [0, 1]; PatcherError for anything else."""
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
