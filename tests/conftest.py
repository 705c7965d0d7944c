"""Shared fixtures: a tiny real run, built once per test session with the real `patcher build`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows torch many times over
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PATCHER_CACHE"] = str(tmp_path_factory.mktemp("patcher-cache"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP pretrained by `patcher pretrain` on Fashion-MNIST's val images and the digits 0-4 (~15 s)."""
    from patcher.stages.pretrain import PretrainOptions, Source, pretrain
    from patcher.training.config import TrainConfig

    options = PretrainOptions(
        sources=[Source("fashion-mnist", "val", None, 0.6), Source("digits", "pretrain", [0, 1, 2, 3, 4], 0.4)],
        model="patcher-tiny",
        train=TrainConfig(steps=120, batch_size=64, lr=2e-3, weight_decay=0.1, warmup_steps=10, checkpoint_every=60),
        device="cpu",
        out=tmp_path_factory.mktemp("pretrain") / "tiny-clip",
    )
    return pretrain(options)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> Path:
    """A run directory from `patcher build` on digits (patch) and fashion-mnist (support) with the tiny CLIP."""
    from patcher.stages.build import BuildOptions, build
    from patcher.training.config import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "tiny"
    options = BuildOptions(
        task="digits",
        support=["fashion-mnist"],
        model=f"local-dir:{tiny_clip}",
        pretrained=None,
        alpha="auto",
        # lr 3e-4: a fine-tune whose chosen alpha is above 0 here, so that patched and zero-shot differ
        train_config=TrainConfig(steps=30, batch_size=32, lr=3e-4, warmup_steps=3, checkpoint_every=10),
        device="cpu",
        out=out,
    )
    return build(options)


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`patcher export` of the tiny run (fp32), shared by the tests that only read it."""
    from patcher.stages.export import ExportOptions, export_run

    return Path(export_run(tiny_run, ExportOptions(out=tmp_path_factory.mktemp("tiny-export") / "onnx")))
