"""`patcher pretrain` on real images: a smaller variant learns the classes it saw by name, not the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults_support import run_patcher
from safetensors.torch import load_file

from patcher.base.files import sha256_file
from patcher.models import load_clip, state_dict_digest
from patcher.stages.pretrain import RECORD_FILENAME, WEIGHTS_FILENAME


@pytest.fixture(scope="module")
def small_pretrained(tiny_clip: Path) -> Path:
    return tiny_clip


def test_zero_shot_above_chance_on_seen_classes_and_not_on_unseen(small_pretrained: Path):
    record = json.loads((small_pretrained / RECORD_FILENAME).read_text())
    fashion = record["zero_shot"]["fashion-mnist"]
    digits = record["zero_shot"]["digits"]["per_class"]
    seen = sum(digits[str(d)] for d in range(5)) / 5
    unseen = sum(digits[str(d)] for d in range(5, 10)) / 5
    assert fashion["accuracy"] > 2.5 * fashion["chance"], fashion
    assert seen > 2.5 * 10.0, digits
    assert unseen < 15.0, digits


def test_output_loads_through_the_ordinary_model_loader(small_pretrained: Path):
    """`local-dir:` loading gives exactly the weights pretraining wrote, and the record's hashes name those files."""
    loaded = load_clip(f"local-dir:{small_pretrained}")
    written = load_file(str(small_pretrained / WEIGHTS_FILENAME))
    assert loaded.weights_sha256 == state_dict_digest(written)
    assert loaded.weights_sha256 != state_dict_digest(load_clip("patcher-tiny").model.state_dict())  # not random
    assert loaded.pretrained is None and loaded.model_cfg["vision_cfg"]["patch_size"] == 7
    record = json.loads((small_pretrained / RECORD_FILENAME).read_text())
    assert set(record["files"]) == {WEIGHTS_FILENAME, "open_clip_config.json", "weights.safetensors"}
    assert all(sha256_file(small_pretrained / name) == entry["sha256"] for name, entry in record["files"].items())
    assert not (small_pretrained / "checkpoints").exists()


def test_an_unknown_objective_is_one_error_line_and_writes_nothing(tmp_path: Path):

    out = tmp_path / "model"
    result = run_patcher("pretrain", "--objective", "pairs", "--out", str(out), timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: unknown pretraining objective 'pairs'") and "classes, instances" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_instance_objective_trains_too(tmp_path: Path):
    """CLIP's loss (`--objective instances`) writes a model that knows the names it saw."""
    from patcher.stages.pretrain import PretrainOptions, Source, pretrain
    from patcher.training.config import TrainConfig

    options = PretrainOptions(
        sources=[Source("fashion-mnist", "val", None, 1.0)], model="patcher-tiny", objective="instances",
        train=TrainConfig(steps=120, batch_size=64, lr=2e-3, weight_decay=0.1, warmup_steps=10, checkpoint_every=60),
        device="cpu", out=tmp_path / "model")
    record = json.loads((pretrain(options) / RECORD_FILENAME).read_text())
    fashion = record["zero_shot"]["fashion-mnist"]
    assert fashion["accuracy"] > 2.5 * fashion["chance"], fashion
    assert set(record["zero_shot"]) == {"fashion-mnist", "digits"}
