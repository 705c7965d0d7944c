"""Choosing the mixing coefficient alpha on held-out data (PAINT's rule), with few evaluations."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Accuracies = Mapping[str, float]

DEFAULT_GRID = tuple(round(i / 10, 1) for i in range(11))


@dataclass
class Selection:
    """The chosen alpha, the rule that chose it, and every evaluation made on the way."""

    alpha: float
    rule: str
    curve: dict[float, dict[str, float]] = field(default_factory=dict)
    warning: str | None = None

    @property
    def evaluations(self) -> int:
        """How many alphas were evaluated."""
        return len(self.curve)


def constraint_rule(patch_tasks: Sequence[str], support_tasks: Sequence[str], tolerance: float) -> str:
    """The rule in words, as the manifest and the CLI state it."""
    patch = ", ".join(patch_tasks)
    if not support_tasks:
        return (
            f"no supported tasks given: chose the alpha with the highest held-out accuracy on {patch} "
            "(the smallest such alpha on ties); nothing guards other tasks, pass --support to protect them"
        )
    return (
        f"maximise held-out accuracy on {patch} subject to every supported task "
        f"({', '.join(support_tasks)}) keeping accuracy >= its zero-shot accuracy - {tolerance:g} points"
    )


def _violation(acc: Accuracies, zeroshot: Accuracies, support: Sequence[str], tolerance: float) -> float:
    return sum(max(0.0, zeroshot[t] - tolerance - acc[t]) for t in support)


def _patch_mean(acc: Accuracies, patch: Sequence[str]) -> float:
    return sum(acc[t] for t in patch) / len(patch)


def objective(
    acc: Accuracies, zeroshot: Accuracies, patch: Sequence[str], support: Sequence[str], tolerance: float
) -> float:
    """Patch accuracy where the constraint holds; else below every feasible value, falling with the violation."""
    violation = _violation(acc, zeroshot, support, tolerance)
    return _patch_mean(acc, patch) if violation == 0 else -1e6 - violation


def choose(
    curve: Mapping[float, Accuracies],
    patch: Sequence[str],
    support: Sequence[str],
    tolerance: float,
    reference: Accuracies | None = None,
) -> Selection:
    """Apply the rule to evaluated points; the reference accuracies are alpha 0's unless given.

    A reference other than alpha 0 (sequential patching measures supported tasks against the original
    zero-shot model) is what can leave no alpha qualifying.
    """
    zeroshot = reference if reference is not None else curve[0.0]
    rule = constraint_rule(patch, support, tolerance)
    feasible = [a for a in curve if _violation(curve[a], zeroshot, support, tolerance) == 0]
    full_curve = {a: dict(v) for a, v in sorted(curve.items())}
    if feasible:
        best = max(sorted(feasible), key=lambda a: _patch_mean(curve[a], patch))
        return Selection(alpha=best, rule=rule, curve=full_curve)
    tasks = [*patch, *support]
    best = max(sorted(curve), key=lambda a: sum(curve[a][t] for t in tasks) / len(tasks))
    warning = (
        f"no alpha keeps every supported task within {tolerance:g} points of zero-shot; "
        f"chose alpha {best:g}, the best mean accuracy over all tasks"
    )
    rule += "; none qualified, so: best mean over all tasks"
    return Selection(alpha=best, rule=rule, curve=full_curve, warning=warning)


def grid_search(
    evaluate: Callable[[float], Accuracies],
    patch: Sequence[str],
    support: Sequence[str],
    tolerance: float,
    grid: Sequence[float] = DEFAULT_GRID,
    reference: Accuracies | None = None,
) -> Selection:
    """Evaluate every alpha of the grid (the papers' 11 points) and apply the rule."""
    curve = {float(a): dict(evaluate(float(a))) for a in grid}
    return choose(curve, patch, support, tolerance, reference)


def golden_search(
    evaluate: Callable[[float], Accuracies],
    patch: Sequence[str],
    support: Sequence[str],
    tolerance: float,
    grid: Sequence[float] = DEFAULT_GRID,
    reference: Accuracies | None = None,
) -> Selection:
    """Golden-section search over the grid's indices for the rule's objective, assumed unimodal in alpha.

    Both ends are always evaluated (alpha 0 is the zero-shot baseline the constraint refers to). The
    answer is the grid search's whenever the objective is unimodal on the grid; ties fall to the left.
    """
    grid = sorted(float(a) for a in grid)
    curve: dict[float, dict[str, float]] = {}

    def acc(index: int) -> dict[str, float]:
        alpha = grid[index]
        if alpha not in curve:
            curve[alpha] = dict(evaluate(alpha))
        return curve[alpha]

    zeroshot = reference if reference is not None else acc(0)
    acc(0)

    def score(index: int) -> float:
        return objective(acc(index), zeroshot, patch, support, tolerance)

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
    return choose(curve, patch, support, tolerance, reference)


SEARCHES = {"golden": golden_search, "grid": grid_search}
