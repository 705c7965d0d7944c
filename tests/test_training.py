"""The training loop: schedule, deterministic batches, and resume reaching the same weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from patcher.models import load_clip
from patcher.models.classifier import MultiHeadClassifier
from patcher.training.loop import CHECKPOINT, TrainConfig, batch_indices, checkpoint_step, lr_factor
from patcher.training.losses import finetune


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 10, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_batches_are_a_function_of_the_step_and_cover_each_epoch():
    first_epoch = torch.cat([batch_indices(100, 10, step, seed=3) for step in range(10)])
    assert sorted(first_epoch.tolist()) == list(range(100))
    assert torch.equal(batch_indices(100, 10, 7, seed=3), batch_indices(100, 10, 7, seed=3))
    assert not torch.equal(batch_indices(100, 10, 7, seed=3), batch_indices(100, 10, 7, seed=4))
    straddling = batch_indices(95, 10, 9, seed=0)  # 90..99 crosses into the second epoch
    assert len(straddling) == 10


def _tiny_classifier() -> MultiHeadClassifier:
    torch.manual_seed(0)
    loaded = load_clip("patcher-tiny")
    head = torch.nn.functional.normalize(torch.randn(64, 3), dim=0) * 10
    return MultiHeadClassifier(loaded.model.visual, {"toy": head})


def _toy_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 3, 32, 32, generator=generator), torch.randint(3, (48,), generator=generator))


def test_resume_reaches_the_same_weights(tmp_path: Path):
    config = TrainConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=4)
    straight = finetune(_tiny_classifier(), _toy_data(), "toy", config)

    class Interrupt(Exception):
        pass

    def stop_after_checkpoint(entry: dict) -> None:
        if entry["step"] == 6:
            raise Interrupt

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    config_logged = TrainConfig(**{**config.as_dict(), "log_every": 1})
    with pytest.raises(Interrupt):
        finetune(_tiny_classifier(), _toy_data(), "toy", config_logged, checkpoint_dir=checkpoints,
                 log=stop_after_checkpoint)
    assert (checkpoints / CHECKPOINT).is_file() and checkpoint_step(checkpoints) == 4
    resumed = finetune(_tiny_classifier(), _toy_data(), "toy", config_logged, checkpoint_dir=checkpoints)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_finetuning_lowers_the_loss_through_a_frozen_head():
    classifier = _tiny_classifier()
    head_before = classifier.head("toy").clone()
    data = _toy_data()
    images, labels = data.tensors

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(classifier(images, "toy")["toy"], labels).item()

    before = loss()
    finetune(classifier, data, "toy", TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=3))
    assert loss() < before
    assert torch.equal(classifier.head("toy"), head_before)
