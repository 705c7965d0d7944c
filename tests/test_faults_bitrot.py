"""A cached image store damaged on disk is never used: its checksum fails on read, the build decodes the images
again and records what a clean cache gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.data.options import DataOptions
from patcher.runs.manifest import load_run
from patcher.stages.build import BuildOptions, build
from patcher.training.config import TrainConfig


def tiny_build(model: Path, out: Path, cache: Path) -> dict:
    """A few steps of `ft` on digits with Fashion-MNIST supported, every held-out and test split on disk."""
    options = BuildOptions(task="digits", support=["fashion-mnist"], model=f"local-dir:{model}", pretrained=None,
                           train_config=TrainConfig(steps=4, batch_size=16, lr=3e-4, warmup_steps=1), device="cpu",
                           out=out, data=DataOptions(mode="stream", workers=0, cache_dir=cache))
    return to_json(load_run(build(options)).manifest.test_accuracy)


def flip_a_byte(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_cached_store_is_decoded_again(tiny_clip: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    clean = tiny_build(tiny_clip, tmp_path / "first", cache)
    stores = sorted(path.parent for path in cache.glob("*/store.json"))
    assert len(stores) == 4  # val and test of both tasks
    for number, store in enumerate(stores):  # pixels in two stores, labels in the other two
        flip_a_byte(store / ("pixels.u8" if number % 2 else "labels.npy"), 0.9)
    capfd.readouterr()
    assert tiny_build(tiny_clip, tmp_path / "second", cache) == clean
    warnings = capfd.readouterr().err
    assert warnings.count("fails its checksum") == len(stores)
    for store in stores:  # decoded again: the files agree with their recorded hashes once more
        record = json.loads((store / "store.json").read_text())
        assert all(sha256_file(store / name) == digest for name, digest in record["sha256"].items())
