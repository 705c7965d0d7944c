"""`patcher export RUN --open-clip DIR`: open_clip itself loads the folder unchanged, and its zero-shot classifier
with the run's class names and templates predicts what the patched model predicts on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patcher.cli import app
from patcher.data.tasks import get_task

runner = CliRunner()


def patched_logits(run: Path, batch: torch.Tensor, task: str) -> np.ndarray:
    """The run's patched classifier (image encoder and baked head) as patcher stores it."""
    from safetensors.torch import load_file

    from patcher.models import build_from_config
    from patcher.models.classifier import MultiHeadClassifier
    from patcher.models.state import split_classifier_state

    model = build_from_config(json.loads((run / "open_clip_config.json").read_text()))
    encoder, heads = split_classifier_state(load_file(str(run / "models" / "patched.safetensors")))
    model.visual.load_state_dict(encoder)
    with torch.no_grad():
        return MultiHeadClassifier(model.visual, heads).eval()(batch, task)[task].numpy()


def test_open_clip_loads_the_patched_model_and_agrees_with_it(tiny_run: Path, tmp_path: Path) -> None:
    from patcher.base.compat import import_open_clip

    open_clip = import_open_clip()
    out = tmp_path / "patched-clip"
    result = runner.invoke(app, ["export", str(tiny_run), "--open-clip", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                     "open_clip_model.safetensors", "patcher_tasks.json"]
    card = (out / "README.md").read_text()
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert f"alpha = {manifest['alpha']['chosen']:g}" in card and "patched on digits" in card
    assert "| digits | patch |" in card and "| fashion-mnist | support |" in card

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    tasks = json.loads((out / "patcher_tasks.json").read_text())
    data = get_task("digits").dataset("test")
    batch = torch.stack([preprocess(data[index][0]) for index in range(len(data))])
    labels = np.array([data[index][1] for index in range(len(data))])
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(model, tokenizer, tasks["digits"]["classnames"],
                                                    tasks["digits"]["templates"], num_classes_per_batch=None,
                                                    device="cpu", use_tqdm=False)
        theirs = (model.encode_image(batch, normalize=True) @ head).numpy()
    ours = patched_logits(tiny_run, batch, "digits")
    top2 = np.sort(ours, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * np.abs(top2[:, 1])  # a near-tie may flip between float paths
    assert clear.mean() > 0.95
    assert (theirs.argmax(1) == ours.argmax(1))[clear].all()
    accuracy = 100 * float((theirs.argmax(1) == labels).mean())
    recorded = manifest["test_accuracy"]["patched"]["digits"]
    assert accuracy == pytest.approx(recorded, abs=100 * (1 - clear.mean()) + 0.01)


def test_an_existing_folder_is_refused_before_work(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    result = runner.invoke(app, ["export", str(tiny_run), "--open-clip", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "pass --overwrite to replace it" in result.output
