"""Choosing a merge method's parameters and coefficient on held-out data, under PAINT's rule extended to merges.

For each setting of the method's parameter grids the merged task vector `delta` is computed once (streamed from the
runs), and the coefficient c of base + c * delta is searched over MERGE_GRID with `MergeRule`: the
mean held-out accuracy of the merged tasks, subject to every supported task staying within its tolerance of
zero-shot and, with `min_retained`, every merged task keeping that share of its own fine-tune's held-out accuracy.
The best setting is the one whose chosen coefficient scores best under the same rule. At most two merged task
vectors (the best so far and the current one) and one candidate model are held at a time; a null-space method
(`<method>-nullspace`) also keeps its base method's delta across the `energy` values, and one input moment per
linear map of the encoder (`activation_stats.py`), collected once per merge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from patcher.base.errors import PatcherError
from patcher.base.progress import console
from patcher.models.state import State
from patcher.patching.activation_stats import supported_moments
from patcher.patching.alpha import SEARCHES, AlphaRule, Selection
from patcher.patching.layerwise import LearntCoefficients, layerwise_delta, learn
from patcher.patching.merge_methods import NULLSPACE, MergeMethod, get_method
from patcher.patching.nullspace import protect
from patcher.patching.session import Session
from patcher.patching.sources import TaskVectors, materialise
from patcher.runs.merge_record import MergeRecord, MergeSetting

# the coefficient's values: PAINT's 0, 0.1, ..., 1 with finer steps below 0.2, where the sum of several task vectors
# already moves far (three summed vectors at 0.1 move the model as far as one at 0.3)
MERGE_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

OwnStates = list[tuple[Callable[[], State], list[str]]]  # each fine-tune (loaded when asked) and its tasks


@dataclass(frozen=True)
class MergeSpec:
    """Which merge method, parameters held fixed (the others searched), the retained bound, the seed (DARE, the
    layer-wise learning)."""

    method: str = "task-arithmetic"
    params: Mapping[str, float] = field(default_factory=dict)
    min_retained: float | None = None
    seed: int = 0
    search: str = "grid"  # the coefficient's search: every value of MERGE_GRID, or golden-section over it

    def check(self) -> MergeMethod:
        """The method; PatcherError for an unknown one, unknown parameters or a bound outside (0, 1]."""
        method = get_method(self.method)
        method.settings(self.params)
        SEARCHES.entry(self.search)  # the coefficient search: an unknown one is one error line
        if self.min_retained is not None and not 0 < self.min_retained <= 1:
            raise PatcherError(f"--min-retained {self.min_retained:g} is not a share in (0, 1]: e.g. 0.9 keeps 90% "
                               "of each merged task's own fine-tuned accuracy")
        return method


@dataclass(frozen=True)
class MergeRule(AlphaRule):
    """PAINT's rule, plus: each merged task keeps `min_retained` of its own fine-tune's accuracy (`own`)."""

    own: Mapping[str, float] = field(default_factory=dict)
    min_retained: float | None = None

    def retained(self, accuracy: Mapping[str, float]) -> dict[str, float]:
        """Each merged task's accuracy over its own fine-tune's (tasks whose fine-tune scored 0 left out)."""
        return {task: accuracy[task] / self.own[task] for task in self.patch if self.own.get(task)}

    def worst_retained(self, accuracy: Mapping[str, float]) -> float | None:
        """The lowest retained share, None without own accuracies."""
        shares = self.retained(accuracy)
        return min(shares.values()) if shares else None

    def violation(self, accuracy: Mapping[str, float], zeroshot: Mapping[str, float]) -> float:
        """Supported tasks' shortfall below their allowance, plus merged tasks' below min_retained (points)."""
        shortfall = super().violation(accuracy, zeroshot)
        if self.min_retained is not None:
            shortfall += sum(max(0.0, self.min_retained * self.own[task] - accuracy[task])
                             for task in self.patch if task in self.own)
        return shortfall

    def describe(self) -> str:
        """The rule in words."""
        text = super().describe()
        if self.min_retained is not None:
            text += (f"; and every merged task keeping >= {self.min_retained:g} of its own fine-tune's held-out "
                     "accuracy")
        return text


@dataclass
class MergeChoice:
    """The chosen setting, its coefficient selection and merged task vector, and every setting tried."""

    params: dict[str, float]
    selection: Selection
    delta: dict[str, torch.Tensor]
    settings: list[MergeSetting]
    layerwise: LearntCoefficients | None = None

    def states(self, base: State, zeroshot: State) -> dict[str, State]:
        """The three models a run stores: zero-shot, the full merge (c = 1), the patched one (chosen c)."""
        return {"zeroshot": zeroshot, "finetuned": materialise(base, self.delta, 1.0),
                "patched": materialise(base, self.delta, self.selection.alpha)}


def own_accuracy(session: Session, states: OwnStates) -> tuple[dict[str, float], dict[str, float]]:
    """Each task's held-out and test accuracy under its own fine-tuned state (one state loaded at a time)."""
    val: dict[str, float] = {}
    test: dict[str, float] = {}
    for load, tasks in states:
        state = load()
        val.update(session.accuracy(state, {task: session.splits.val[task] for task in tasks}))
        test.update(session.accuracy(state, {task: session.splits.test[task] for task in tasks}))
        del state
    return val, test


class Deltas:
    """Each setting's merged task vector; for a protected method, its base method's delta (kept for the next
    setting that differs only in `energy`) projected with the supported tasks' input moments, collected once."""

    def __init__(self, session: Session, method: MergeMethod, vectors: TaskVectors, rule: MergeRule,
                 seed: int) -> None:
        self.session, self.method, self.vectors, self.rule, self.seed = session, method, vectors, rule, seed
        self.moments = supported_moments(session, list(rule.support), seed) if method.protect else None
        self.cached: tuple[dict[str, float], dict[str, torch.Tensor]] | None = None

    def of(self, params: dict[str, float]) -> tuple[dict[str, torch.Tensor], LearntCoefficients | None]:
        """The setting's delta, and the learnt coefficients of a layer-wise method."""
        method = self.method
        if method.combine is None:
            learnt = learn(self.session, self.vectors, list(self.rule.patch), str(method.learnt), params, self.seed)
            return layerwise_delta(self.vectors, learnt, float(params["init"])), learnt
        if self.moments is None:
            return method.combine(self.vectors, params, self.seed), None
        base_params = {k: v for k, v in params.items() if k != NULLSPACE.name}
        if self.cached is None or self.cached[0] != base_params:
            self.cached = None  # the previous base delta is let go before the next is computed
            self.cached = (base_params, method.combine(self.vectors, base_params, self.seed))
        delta, ranks = protect(self.cached[1], self.moments, float(params[NULLSPACE.name]))
        kept = sum(ranks.values())
        console.print(f"{method.name} energy {params[NULLSPACE.name]:g}: {kept} protected directions over "
                      f"{len(ranks)} weights (mean {kept / max(len(ranks), 1):.1f})")
        return delta, None


def _score(rule: MergeRule, selection: Selection) -> float:
    reference = rule.reference if rule.reference is not None else selection.curve[0.0]
    return rule.objective(selection.curve[selection.alpha], reference)


def search(session: Session, method: MergeMethod, vectors: TaskVectors, rule: MergeRule, spec: MergeSpec,
           fixed_alpha: float | None) -> MergeChoice:
    """The method's best setting and coefficient on held-out data (`spec`: fixed parameters, seed, search)."""
    seed = spec.seed
    best: MergeChoice | None = None
    best_score = float("-inf")
    settings: list[MergeSetting] = []
    deltas = Deltas(session, method, vectors, rule, seed)
    for params in method.settings(spec.params):
        delta, learnt = deltas.of(params)
        shown = ", ".join(f"{k} {v:g}" for k, v in params.items())
        selection = session.select(lambda c, d=delta: materialise(vectors.base, d, c), rule, spec.search, fixed_alpha,
                                   description=f"{method.name}{' ' + shown if shown else ''}: choosing the "
                                               "coefficient", grid=MERGE_GRID)
        accuracy = selection.curve[selection.alpha]
        reference = rule.reference if rule.reference is not None else selection.curve[0.0]
        settings.append(MergeSetting(dict(params), selection.alpha, rule.patch_mean(accuracy),
                                     rule.worst_retained(accuracy), rule.violation(accuracy, reference) == 0))
        score = _score(rule, selection)
        if score > best_score:
            best_score = score
            best = MergeChoice(dict(params), selection, delta, settings, learnt)
        del delta
    assert best is not None
    return best


@dataclass
class MergeOutcomeParts:
    """What a merge records: the method and its choice, the rule, each task's own fine-tune accuracy, and the
    patched model's test accuracy once measured (`tested`)."""

    method: MergeMethod
    spec: MergeSpec
    choice: MergeChoice
    rule: MergeRule
    own_test: dict[str, float]
    tested: dict[str, float] = field(default_factory=dict)

    def record(self) -> MergeRecord:
        """The manifest's `multi.merge`."""
        rule, choice = self.rule, self.choice
        val_retained = rule.retained(choice.selection.curve[choice.selection.alpha])
        test_retained = {task: self.tested[task] / self.own_test[task] for task in rule.patch
                         if self.own_test.get(task) and task in self.tested}
        shares = test_retained or val_retained
        worst = min(shares, key=lambda task: shares[task]) if shares else rule.patch[0]
        layerwise = choice.layerwise.as_record(list(rule.patch)) if choice.layerwise is not None else None
        return MergeRecord(method=self.method.name, title=self.method.title, reference=self.method.reference,
                           needs=self.method.needs, params=choice.params, seed=self.spec.seed,
                           min_retained=self.spec.min_retained, own_val_accuracy=dict(rule.own),
                           own_test_accuracy=dict(self.own_test), val_retained=_rounded(val_retained),
                           test_retained=_rounded(test_retained), worst_task=worst, settings=choice.settings,
                           layerwise=layerwise)


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {key: round(value, 6) for key, value in values.items()}


def merge_states(session: Session, spec: MergeSpec, vectors: TaskVectors, rule: AlphaRule, own: OwnStates,
                 fixed_alpha: float | None) -> tuple[dict[str, State], Selection, MergeOutcomeParts]:
    """Merge with `spec`'s method under `rule` extended by the retained bound: the zero-shot, full-merge and
    patched states, the coefficient's selection, and what the manifest records."""
    method = spec.check()
    own_val, own_test = own_accuracy(session, own)
    merge_rule = MergeRule(rule.patch, rule.support, rule.tolerance, rule.reference, rule.tolerances, own=own_val,
                           min_retained=spec.min_retained)
    choice = search(session, method, vectors, merge_rule, spec, fixed_alpha)
    states = choice.states(vectors.base, session.zeroshot)
    choice.delta = {}  # the stored states hold what is needed
    return states, choice.selection, MergeOutcomeParts(method, spec, choice, merge_rule, own_test)
