"""Deterministic, seeded index splits: the held-out validation split and partitions of unsplit datasets.

Both use numpy's PCG64 generator (`numpy.random.default_rng(seed).permutation`), whose output is the same
on every platform and numpy version that has it, so a split is reproducible anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def holdout_indices(
    n: int, fraction: float = 0.1, max_size: int = 5000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (train, val): val is a seeded `fraction` of n, at most `max_size`, at least 1."""
    if n < 0 or not 0.0 <= fraction < 1.0 or max_size < 0:
        raise ValueError(f"bad holdout arguments: n={n}, fraction={fraction}, max_size={max_size}")
    size = min(max_size, max(1, int(n * fraction))) if n > 1 and fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def partition_indices(labels: Sequence[int], weights: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Split range(len(labels)) into parts sized in proportion to integer `weights`, stratified by label.

    Items are grouped by label, shuffled within each label, and dealt out in the repeating pattern of the
    weights (weights (4, 1): four to part 0, one to part 1, ...), so each part gets its share of every
    class to within one item and the part sizes are exact overall.
    """
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive integers, got {weights}")
    labels = np.asarray(labels, dtype=np.int64)
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pattern = np.repeat(np.arange(len(weights)), weights)
    assignment = pattern[np.arange(len(order)) % len(pattern)]
    return [np.sort(order[assignment == part]) for part in range(len(weights))]


def train_test_indices(
    labels: Sequence[int], weights: tuple[int, int] = (4, 1), keys: Sequence[str] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded stratified {"train", "test"} indices for a dataset that has no official test split.

    `keys` (file paths, say) put the items in a fixed order first, so that neither the split nor the order
    of items within a part depends on the order in which the file system listed them.
    """
    order = np.arange(len(labels)) if keys is None else sorted(range(len(keys)), key=keys.__getitem__)
    order = np.asarray(order, dtype=np.int64)
    train, test = partition_indices(np.asarray(labels, dtype=np.int64)[order], weights, seed)
    return {"train": order[train], "test": order[test]}
