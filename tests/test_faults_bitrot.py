"""A cached image store damaged on disk is never used: its checksum fails on read, the build decodes the images
again and records what a clean cache gives. A fill killed half-way leaves a partial the next build removes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults_support import ArrayImages, environment, kill9, random_images, wait_for

from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.data.image_store import build_store
from patcher.data.options import DataOptions
from patcher.runs.manifest import load_run
from patcher.stages.build import BuildOptions, build
from patcher.training.config import TrainConfig

CFG = {"size": 24, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
       "interpolation": "bicubic", "resize_mode": "shortest"}


def tiny_build(model: Path, out: Path, cache: Path) -> dict:
    """A few steps of `ft` on digits with count-objects supported (840 held-out and test images, not 15,000),
    every held-out and test split on disk."""
    options = BuildOptions(task="digits", support=["count-objects"], model=f"local-dir:{model}", pretrained=None,
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


FILL = """
import sys
sys.path.insert(0, {tests!r})
from faults_support import ArrayImages, random_images
from patcher.data.image_store import build_store
build_store(ArrayImages(random_images({count}), delay_s=0.01), {cfg!r}, "decoding", False, cache_dir=Path({cache!r}))
"""


def test_a_fill_killed_by_kill_9_leaves_a_partial_the_next_build_removes(tmp_path: Path) -> None:
    cache, count = tmp_path / "cache", 256
    script = "from pathlib import Path\n" + FILL.format(tests=str(Path(__file__).parent), count=count, cfg=CFG,
                                                      cache=str(cache))
    child = subprocess.Popen([sys.executable, "-c", script], env=environment(), stderr=subprocess.PIPE,
                             start_new_session=True)

    def filling() -> bool:  # a first batch of pixels written into the staging folder
        return any(p.stat().st_size > 0 for p in cache.glob(".*.partial-*/pixels.u8")) or child.poll() is not None

    wait_for(filling, 120, interval=0.005)
    assert child.poll() is None, child.stderr.read() if child.stderr else ""
    kill9(child)
    assert list(cache.glob(".*.partial-*")), "the kill must leave a half-filled store"
    store, _ = build_store(ArrayImages(random_images(count)), CFG, "decoding", False, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == [store.path.parent.name]  # no partial, no lock
    complete, _ = build_store(ArrayImages(random_images(count)), CFG, "decoding", True)
    assert np.array_equal(store.read(np.arange(count)), complete.read(np.arange(count)))
    assert np.array_equal(store.labels, complete.labels)
