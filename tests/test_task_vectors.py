"""Interpolation and task-vector arithmetic on real open_clip encoders."""

from __future__ import annotations

import pytest
import torch

from patcher.base.errors import PatcherError
from patcher.models import load_clip
from patcher.patching.task_vectors import TaskVector, interpolate


@pytest.fixture(scope="module")
def two_encoders() -> tuple[dict, dict]:
    torch.manual_seed(0)
    zeroshot = load_clip("patcher-tiny").model.visual.state_dict()
    torch.manual_seed(1)
    finetuned = load_clip("patcher-tiny").model.visual.state_dict()
    return zeroshot, finetuned


def test_alpha_zero_and_one_reproduce_the_two_models_exactly(two_encoders):
    zeroshot, finetuned = two_encoders
    at_zero = interpolate(zeroshot, finetuned, 0.0)
    at_one = interpolate(zeroshot, finetuned, 1.0)
    for key in zeroshot:
        assert torch.equal(at_zero[key], zeroshot[key]), key
        assert torch.equal(at_one[key], finetuned[key]), key


def test_midpoint_is_the_average_and_matches_task_vector_form(two_encoders):
    zeroshot, finetuned = two_encoders
    middle = interpolate(zeroshot, finetuned, 0.5)
    via_vector = TaskVector.from_states(zeroshot, finetuned).apply_to(zeroshot, 0.5)
    for key in zeroshot:
        expected = (zeroshot[key].float() + finetuned[key].float()) / 2
        torch.testing.assert_close(middle[key].float(), expected)
        torch.testing.assert_close(via_vector[key], middle[key])


def test_integer_buffers_are_untouched():
    zeroshot = {"weight": torch.zeros(3), "count": torch.tensor([1, 2, 3])}
    finetuned = {"weight": torch.ones(3), "count": torch.tensor([7, 8, 9])}
    mixed = interpolate(zeroshot, finetuned, 0.3)
    assert torch.equal(mixed["count"], zeroshot["count"])
    assert "count" not in TaskVector.from_states(zeroshot, finetuned).vector


def test_mismatched_architectures_are_refused(two_encoders):
    zeroshot, _ = two_encoders
    other = load_clip("patcher-mini").model.visual.state_dict()
    with pytest.raises(PatcherError, match="different architectures"):
        interpolate(zeroshot, other, 0.5)


def test_alpha_outside_unit_interval_is_refused(two_encoders):
    zeroshot, finetuned = two_encoders
    with pytest.raises(PatcherError, match="outside"):
        interpolate(zeroshot, finetuned, 1.5)


def test_task_vector_arithmetic():
    base = {"w": torch.zeros(2)}
    a = TaskVector.from_states(base, {"w": torch.tensor([1.0, 0.0])})
    b = TaskVector.from_states(base, {"w": torch.tensor([0.0, 2.0])})
    merged = sum([a, b]) * 0.5
    assert torch.equal(merged.apply_to(base)["w"], torch.tensor([0.5, 1.0]))
    assert torch.equal((a - a).vector["w"], torch.zeros(2))
    assert torch.equal((-b).apply_to(base, scaling=2.0)["w"], torch.tensor([0.0, -4.0]))
