"""The training loop: schedule, deterministic batches, and resume reaching the same weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from patcher.data.items import TensorItems
from patcher.data.prepared_splits import TrainSplit
from patcher.data.tasks import get_task
from patcher.models import load_clip
from patcher.training.config import TrainConfig
from patcher.training.loop import CHECKPOINT, Tracking, checkpoint_step, lr_factor, train
from patcher.training.methods import MethodSetup
from patcher.training.methods.ft import FineTune
from patcher.training.sampling import batch_indices


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
    assert len(straddling) == 10 and len(set(straddling.tolist())) == 10


def _fine_tune(config: TrainConfig, checkpoint_dir: Path | None = None, log=None) -> FineTune:
    """`ft` of a tiny CLIP's encoder on 48 random images through a random 3-way head."""
    torch.manual_seed(0)
    loaded = load_clip("patcher-tiny")
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(48, 3, 28, 28, generator=generator), torch.randint(3, (48,), generator=generator)
    head = torch.nn.functional.normalize(torch.randn(64, 3, generator=generator), dim=0) * 10
    task = get_task("digits")
    setup = MethodSetup(loaded, {"toy": TrainSplit(TensorItems(images, labels))}, {"toy": task}, {"toy": head},
                        config)
    method = FineTune(setup, None)
    train(method.encoder, method.encoder.parameters(), method.step_loss, config, "cpu",
          Tracking(checkpoint_dir=checkpoint_dir, log=log))
    method.close()
    return method


def test_resume_reaches_the_same_weights(tmp_path: Path):
    config = TrainConfig(steps=8, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=4, log_every=1)
    straight = _fine_tune(config).state()

    class Interrupt(Exception):
        pass

    def stop_after_checkpoint(entry: dict) -> None:
        if entry["step"] == 6:
            raise Interrupt

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    with pytest.raises(Interrupt):
        _fine_tune(config, checkpoints, stop_after_checkpoint)
    assert (checkpoints / CHECKPOINT).is_file() and checkpoint_step(checkpoints) == 4
    resumed = _fine_tune(config, checkpoints).state()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_finetuning_lowers_the_loss_through_a_frozen_head():
    config = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=3)
    untrained = _fine_tune(TrainConfig(steps=1, batch_size=16, lr=1e-12, warmup_steps=0))
    method = _fine_tune(config)
    images, labels = method.setup.train_splits["toy"].items.inputs, method.setup.train_splits["toy"].items.labels

    def loss(model: FineTune) -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model.classifier(images, "toy")["toy"], labels).item()

    assert loss(method) < loss(untrained) - 0.1
    assert torch.equal(method.classifier.head("toy"), untrained.classifier.head("toy"))


def test_class_contrastive_loss_is_clips_loss_when_every_image_has_its_own_class():
    """UniCL's loss reduces to CLIP's with one image per class; with shared classes each caption's target is
    spread evenly over its class's images, and the order of the images does not matter."""
    import open_clip
    import torch.nn.functional as F

    from patcher.training.losses import class_contrastive_loss

    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 8, generator=generator), dim=1)
    captions = F.normalize(torch.randn(6, 8, generator=generator), dim=1)
    scale = torch.tensor(10.0)
    expected = open_clip.ClipLoss()(images, captions, scale)
    assert torch.allclose(class_contrastive_loss(images, captions, torch.arange(6), scale), expected, atol=1e-6)

    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    per_class = captions[:3]
    loss = class_contrastive_loss(images, per_class, classes, scale)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(class_contrastive_loss(images[order], per_class, classes[order], scale), loss, atol=1e-6)
    members = F.one_hot(classes, 3).T.float()
    logits = scale * images @ per_class.T
    manual = (F.cross_entropy(logits, classes) + F.cross_entropy(logits.T, members / 2)) / 2
    assert torch.allclose(loss, manual, atol=1e-6)
