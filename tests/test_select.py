"""The alpha selection rule and the search on constructed accuracy curves."""

from __future__ import annotations

import math
import random

import pytest

from patcher.patching.alpha import DEFAULT_GRID, AlphaRule, golden_search, grid_search


def curve_from(patch: list[float], support: list[float]) -> dict[float, dict[str, float]]:
    return {a: {"p": p, "s": s} for a, p, s in zip(DEFAULT_GRID, patch, support, strict=True)}


def test_picks_best_patch_accuracy_within_tolerance():
    curve = curve_from(
        patch=[30, 50, 65, 75, 82, 86, 89, 91, 92, 93, 93.5],
        support=[80, 80.2, 80.1, 79.8, 79.5, 79.1, 78.7, 77, 75, 72, 70],
    )
    selection = AlphaRule(["p"], ["s"], 1.0).choose(curve)
    assert selection.alpha == 0.5  # 0.6 drops support to 78.7 < 80 - 1
    assert selection.warning is None
    assert "zero-shot accuracy - 1 points" in selection.rule


def test_tolerance_widens_the_choice():
    curve = curve_from(
        patch=[30, 50, 65, 75, 82, 86, 89, 91, 92, 93, 93.5],
        support=[80, 80.2, 80.1, 79.8, 79.5, 79.1, 78.7, 77, 75, 72, 70],
    )
    assert AlphaRule(["p"], ["s"], 3.0).choose(curve).alpha == 0.7


def test_no_supported_task_maximises_patch_accuracy_and_says_so():
    curve = curve_from(patch=[30, 50, 60, 70, 80, 90, 95, 95, 94, 93, 92], support=[0] * 11)
    selection = AlphaRule(["p"], [], 1.0).choose({a: {"p": v["p"]} for a, v in curve.items()})
    assert selection.alpha == 0.6  # first of the tied maxima
    assert "no supported tasks" in selection.rule


def test_none_qualifies_falls_back_to_best_mean_with_warning():
    # against an earlier reference (as in sequential patching) even alpha 0 can fail the constraint
    curve = {0.0: {"p": 10, "s": 70}, 0.5: {"p": 80, "s": 60}, 1.0: {"p": 90, "s": 20}}
    selection = AlphaRule(["p"], ["s"], 1.0, {"p": 10, "s": 90}).choose(curve)
    assert selection.alpha == 0.5  # means: 40, 70, 55
    assert selection.warning is not None and "no alpha keeps" in selection.warning
    assert "none qualified" in selection.rule


def test_alpha_zero_always_qualifies_against_itself():
    curve = {0.0: {"p": 10, "s": 90}, 0.5: {"p": 80, "s": 50}, 1.0: {"p": 90, "s": 20}}
    selection = AlphaRule(["p"], ["s"], 0.0).choose(curve)
    assert selection.alpha == 0.0 and selection.warning is None


def test_golden_search_matches_grid_with_fewer_evaluations():
    rng = random.Random(0)
    for _ in range(500):
        peak, limit, height = rng.random(), rng.random(), rng.uniform(5, 60)
        power = rng.choice([1.0, 1.5, 2.0])

        def evaluate(alpha: float, peak=peak, limit=limit, height=height, power=power) -> dict[str, float]:
            return {"p": 30 + height - height * abs(alpha - peak) ** power,
                    "s": 80 - 30 * max(0.0, alpha - limit) ** 1.2}

        grid = grid_search(evaluate, AlphaRule(["p"], ["s"], 1.0))
        golden = golden_search(evaluate, AlphaRule(["p"], ["s"], 1.0))
        assert golden.alpha == grid.alpha
        assert golden.evaluations < grid.evaluations == 11
        assert 0.0 in golden.curve and 1.0 in golden.curve


def test_golden_search_records_every_evaluation():
    seen: list[float] = []

    def evaluate(alpha: float) -> dict[str, float]:
        seen.append(alpha)
        return {"p": -math.fabs(alpha - 0.3)}

    selection = golden_search(evaluate, AlphaRule(["p"], [], 1.0))
    assert selection.alpha == pytest.approx(0.3)
    assert sorted(seen) == sorted(selection.curve)
    assert len(seen) == len(set(seen)) == selection.evaluations
