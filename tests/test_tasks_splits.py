"""Seeded splits: the held-out validation split and the partitions of datasets without a test split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from patcher.data.tasks.splits import holdout_indices, partition_indices, train_test_indices


@pytest.mark.parametrize(("n", "val_size"), [(100, 10), (599, 59), (12_000, 1_200), (60_000, 5_000), (2, 1)])
def test_holdout_size_is_ten_percent_capped_at_5000(n: int, val_size: int) -> None:
    train, val = holdout_indices(n)
    assert len(val) == val_size
    assert len(train) == n - val_size


def test_holdout_is_a_disjoint_sorted_cover() -> None:
    train, val = holdout_indices(1_000)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted([*train.tolist(), *val.tolist()]) == list(range(1_000))
    assert list(train) == sorted(train) and list(val) == sorted(val)


def test_holdout_is_deterministic_and_pinned() -> None:
    # Pinned values: PCG64 (numpy.random.default_rng) gives these on every platform for seed 0.
    assert holdout_indices(100)[1].tolist() == [5, 16, 20, 36, 52, 72, 82, 90, 93, 94]
    assert holdout_indices(60_000)[1][:5].tolist() == [9, 24, 49, 60, 65]
    first, second = holdout_indices(5_000), holdout_indices(5_000)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(holdout_indices(5_000, seed=1)[1], first[1])


def test_holdout_of_tiny_sets() -> None:
    assert [len(part) for part in holdout_indices(0)] == [0, 0]
    assert [len(part) for part in holdout_indices(1)] == [1, 0]


def test_partition_is_stratified_and_exact() -> None:
    labels = np.repeat(np.arange(7), [30, 31, 29, 5, 1, 100, 3])
    parts = partition_indices(labels, (1, 1, 1))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    for cls, count in Counter(labels.tolist()).items():
        shares = [int((labels[part] == cls).sum()) for part in parts]
        assert max(shares) - min(shares) <= 1, (cls, shares)
        assert sum(shares) == count


def test_partition_weights_give_exact_overall_sizes() -> None:
    labels = [i % 10 for i in range(1_000)]
    train, test = partition_indices(labels, (4, 1))
    assert (len(train), len(test)) == (800, 200)
    assert all(int(np.sum(np.asarray(labels)[test] == cls)) == 20 for cls in range(10))
    assert [part.tolist() for part in partition_indices(labels, (4, 1))] == [train.tolist(), test.tolist()]


def test_partition_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        partition_indices([0, 1], (1, 0))


def test_train_test_indices_do_not_depend_on_listing_order() -> None:
    keys = [f"img_{i:03d}.jpg" for i in range(50)]
    labels = [i % 3 for i in range(50)]
    shuffled = np.random.default_rng(7).permutation(50)
    listed_keys = [keys[i] for i in shuffled]
    listed_labels = [labels[i] for i in shuffled]
    plain = train_test_indices(labels, keys=keys)
    relisted = train_test_indices(listed_labels, keys=listed_keys)
    for part in ("train", "test"):
        assert [keys[i] for i in plain[part]] == [listed_keys[i] for i in relisted[part]]
    assert len(plain["test"]) == 10
