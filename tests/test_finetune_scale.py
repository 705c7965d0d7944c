"""Fine-tuning at scale: gradient accumulation gives the one-batch step, gradient checkpointing changes no weight,
--report-to tensorboard writes curves TensorBoard's own reader finds, --eval-every records held-out accuracy,
--shots picks K images per class, the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scale_support import fine_tune, make_method, max_difference, tiny_setup

from patcher.base.errors import PatcherError
from patcher.data.shots import FewShot, dataset_labels, few_shot_indices
from patcher.data.tasks import get_task
from patcher.runs.manifest import load_run
from patcher.training.config import TrainConfig
from patcher.training.loop import MethodTracking, train_method
from patcher.training.sampling import Micro, micro_rows

METHODS = ["ft", "flyp", "carft"]


def _start(method: str) -> dict[str, torch.Tensor]:
    return make_method(method, tiny_setup(torch.float64)).state()


@pytest.mark.parametrize("method", METHODS)
def test_four_micro_batches_of_16_give_the_step_of_one_batch_of_64(method: str):
    """float64, where rounding cannot hide a missing or doubled term: every weight within 1e-5 after 4 steps."""
    start = _start(method)
    whole = fine_tune(method, tiny_setup(torch.float64, accum_steps=1))
    micro = fine_tune(method, tiny_setup(torch.float64, accum_steps=4))
    assert max_difference(whole, start) > 1e-3  # training moved the weights, so agreeing means something
    assert max_difference(whole, micro) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_in_float32_micro_batches_agree_but_for_the_attention_key_biases(method: str):
    """float32: every weight within 1e-5 except the attention key biases, whose gradient is zero in exact arithmetic
    (softmax ignores a constant added to every key's score): AdamW divides their rounding noise by its own size
    and moves them by up to lr whichever way the noise falls, with or without accumulation."""
    whole = fine_tune(method, tiny_setup(torch.float32, accum_steps=1))
    micro = fine_tune(method, tiny_setup(torch.float32, accum_steps=4))
    assert max_difference(whole, micro, skip_key_bias=True) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_accumulated_gradients_are_the_batch_gradient(method: str):
    """Before any optimiser step: the four passes' gradients add up to the one-pass gradient, FLYP's temperature
    included (trained in the last pass only, not four times)."""
    gradients = []
    for count in (1, 4):
        setup = tiny_setup(torch.float64, accum_steps=count)
        trained = make_method(method, setup)
        stage = trained.stages()[-1]
        stage.module.train()
        stage.module.zero_grad(set_to_none=True)
        losses = []
        for index in range(count):
            loss = stage.step_loss(0) if count == 1 else stage.step_loss(0, Micro(index, count))
            loss.backward()
            losses.append(loss.item())
        gradients.append(({name: p.grad.clone() for name, p in stage.module.named_parameters() if p.grad is not None},
                          sum(losses)))
        trained.close()
    (whole, whole_loss), (micro, micro_loss) = gradients
    assert whole.keys() == micro.keys() and len(whole) > 10
    if method == "flyp":
        assert "logit_scale" in whole and whole["logit_scale"].abs().item() > 1e-6
    for name in whole:
        assert torch.allclose(whole[name], micro[name], rtol=1e-9, atol=1e-12), name
    assert micro_loss == pytest.approx(whole_loss, rel=1e-6)  # the logged loss is the batch's (a float32 sum)


@pytest.mark.parametrize("method", ["flyp", "carft"])
def test_resume_with_micro_batches_reaches_the_same_weights_bit_for_bit(method: str, tmp_path: Path):
    """Batches are a function of the step, micro-batches of the batch: a run stopped after its checkpoint and resumed
    ends exactly where an uninterrupted one does."""
    settings = {"accum_steps": 4, "steps": 6, "checkpoint_every": 3}
    straight = fine_tune(method, tiny_setup(torch.float32, **settings))

    class Interrupt(Exception):
        pass

    def stop(line: dict) -> None:
        if line["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_method(make_method(method, tiny_setup(torch.float32, **settings)),
                     tracking=MethodTracking(checkpoint_dir=tmp_path, on_log=stop))
    resumed = make_method(method, tiny_setup(torch.float32, **settings))
    train_method(resumed, tracking=MethodTracking(checkpoint_dir=tmp_path))
    assert all(torch.equal(straight[key], value) for key, value in resumed.state().items())


def test_micro_batches_take_an_equal_run_of_every_task_and_cover_the_batch():
    sizes = [10, 7]
    rows = [micro_rows(sizes, Micro(index, 4)).tolist() for index in range(4)]
    assert sorted(row for part in rows for row in part) == list(range(17))
    assert rows[0] == [0, 1, 2, 10, 11] and rows[3] == [8, 9, 16]
    with pytest.raises(PatcherError, match="accum-steps"):
        TrainConfig(batch_size=64, accum_steps=5).check()
    with pytest.raises(PatcherError, match="shots"):
        TrainConfig(shots=0).check()
    with pytest.raises(PatcherError, match="report-to"):
        TrainConfig(report_to=("mlflow",)).check()


@pytest.mark.parametrize("method", ["ft", "flyp"])
def test_gradient_checkpointing_changes_no_weight_and_is_on_only_while_training(method: str):
    start = make_method(method, tiny_setup(torch.float32)).state()
    plain = fine_tune(method, tiny_setup(torch.float32))
    setup = tiny_setup(torch.float32, grad_checkpointing=True)
    model = setup.loaded.model
    towers = lambda: (model.visual.transformer.grad_checkpointing, model.transformer.grad_checkpointing)  # noqa: E731
    flags: list[tuple[bool, bool]] = []
    checkpointed = make_method(method, setup)
    train_method(checkpointed, tracking=MethodTracking(on_log=lambda _: flags.append(towers())))
    assert max_difference(plain, start) > 1e-3
    assert max_difference(plain, checkpointed.state()) <= 1e-5
    assert set(flags) == {(True, method == "flyp")}  # the towers this method trains, while it trains
    assert towers() == (False, False)


# --shots


def test_shots_take_k_images_of_every_class_seeded():
    digits = get_task("digits").dataset("train")
    labels = dataset_labels(digits)
    assert labels.tolist() == [digits[i][1] for i in range(len(digits))]  # read without decoding, the same labels
    chosen = few_shot_indices(labels, 4, seed=0, num_classes=10)
    assert np.bincount(labels[chosen], minlength=10).tolist() == [4] * 10
    assert np.array_equal(chosen, few_shot_indices(labels, 4, seed=0, num_classes=10))
    assert not np.array_equal(chosen, few_shot_indices(labels, 4, seed=1, num_classes=10))
    assert set(few_shot_indices(labels, 2, seed=0).tolist()) <= set(chosen.tolist())  # K grows by adding images
    view = FewShot(4, seed=0).select(digits, "digits", 10)
    assert len(view) == 40 and [view[i][1] for i in range(40)] == labels[chosen].tolist()
    with pytest.raises(PatcherError, match="--shots 500 on digits: class 0 has"):
        FewShot(500).select(digits, "digits", 10)
    with pytest.raises(ValueError, match="class 9 has 0"):
        few_shot_indices(labels[labels < 9], 1, num_classes=10)


def test_shots_are_the_same_in_another_process():
    """Another interpreter, another hash seed: the same images."""
    code = ("import json; from patcher.data.shots import dataset_labels, few_shot_indices; "
            "from patcher.data.tasks import get_task; "
            "print(json.dumps(few_shot_indices(dataset_labels(get_task('digits').dataset('train')), 5, 3, 10)"
            ".tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                           check=True)
    mine = few_shot_indices(dataset_labels(get_task("digits").dataset("train")), 5, 3, 10)
    assert json.loads(other.stdout) == mine.tolist()


# a build that uses them all, through the CLI


@pytest.mark.slow
def test_a_build_reports_to_tensorboard_evaluates_and_trains_few_shot(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    command = [sys.executable, "-m", "patcher", "build", "--task", "digits", "--model", "patcher-tiny",
               "--pretrained", "none", "--steps", "6", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "1",
               "--alpha", "auto", "--search", "grid", "--accum-steps", "2", "--grad-checkpointing", "--shots", "5",
               "--eval-every", "3", "--report-to", "tensorboard", "--workers", "0", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_run(out).manifest
    training = manifest.training
    assert (training.shots, training.accum_steps, training.grad_checkpointing) == (5, 2, True)
    assert training.eval_every == 3 and training.report_to == ("tensorboard",)
    assert manifest.tasks["digits"].sizes["train"] == 50  # 5 of each of 10 classes
    assert [e.step for e in training.evaluations] == [3, 6] and set(training.evaluations[0].val_accuracy) == {"digits"}
    assert not any(name.startswith("reports/") for name in manifest.files)  # wall-clock curves stay out

    log = [json.loads(line) for line in (out / "train.log").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 3, 6]  # every 10th step, the last, and each evaluation
    assert all("images_per_s" not in line and line["grad_norm"] > 0 for line in log)
    assert [line["val_accuracy"] for line in log if "val_accuracy" in line] == [
        e.val_accuracy for e in training.evaluations]

    events = EventAccumulator(str(out / "reports" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "heldout/digits",
            "alpha_curve/digits", "alpha/chosen"} <= tags
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == [
        (line["step"], pytest.approx(line["loss"], abs=1e-5)) for line in log]
    assert [e.step for e in events.Scalars("heldout/digits")] == [3, 6]
    assert events.Scalars("heldout/digits")[-1].value == pytest.approx(training.evaluations[-1].val_accuracy["digits"])
    curve = {round(e.step / 1000, 3): e.value for e in events.Scalars("alpha_curve/digits")}
    assert curve == {round(p.alpha, 3): pytest.approx(p.val_accuracy["digits"]) for p in manifest.alpha.curve}
    assert events.Scalars("alpha/chosen")[-1].value == pytest.approx(manifest.alpha.chosen)
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
