"""Shared fixtures (a tiny real run, built once per test session with the real `patcher build`) and the lanes.

The fast lane (`pytest -m "not slow"`, scripts/test-fast.sh) builds no model and starts no server:
- a test that uses a model-building fixture (MODEL_FIXTURES, directly or through another fixture) is marked slow
  here, at collection;
- a test outside the slow lane that runs a pipeline stage in process (pretrain, build, merge, export: imported
  before it starts) or starts a heavy process (tritonserver, the patcher CLI's stages, torchrun, a benchmark
  script) fails with one line saying to mark it slow (`_fast_lane_guard`). tests/test_lanes.py checks both rules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ("pytester",)  # tests/test_lanes.py runs small suites under the rules below

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows torch many times over
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL_FIXTURES = frozenset({"tiny_clip", "tiny_run", "tiny_export"})  # every shared model is built through these
STAGE_FUNCTIONS = {"patcher.stages.pretrain": "pretrain", "patcher.stages.build": "build",
                   "patcher.stages.merge": "merge_runs", "patcher.stages.export": "export_run"}
CLI_STAGES = frozenset({"pretrain", "build", "merge", "export", "triton", "serve", "demo", "bench", "verify"})
SLOW_HINT = "mark it @pytest.mark.slow (the fast lane builds no model and starts no server)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test whose fixtures build a model (MODEL_FIXTURES, directly or through other fixtures) is slow."""
    for item in items:
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


def heavy_command(args: Any) -> str | None:
    """What makes a command heavy (a server, a pipeline stage, a benchmark), None for an ordinary one."""
    words = [str(word) for word in (args if isinstance(args, list | tuple) else str(args).split())]
    names = [Path(word).name for word in words]
    if any(name in ("tritonserver", "torchrun", "moto_server") for name in names):
        return f"it starts {next(n for n in names if n in ('tritonserver', 'torchrun', 'moto_server'))}"
    if any(Path(word).parent.name == "bench" and word.endswith(".py") for word in words):
        return "it runs a benchmark script"
    for index, name in enumerate(names):
        calls_cli = name == "patcher" or (name == "-m" and index + 1 < len(names) and names[index + 1] == "patcher")
        after = names[index + (2 if name == "-m" else 1):]
        if calls_cli and after and after[0] in CLI_STAGES:
            return f"it runs `patcher {after[0]}`"
    return None


def _ours(module_name: str) -> bool:
    """patcher's modules and the tests' (only these are searched: other packages' modules may import on getattr)."""
    last = module_name.rsplit(".", 1)[-1]
    return module_name.startswith("patcher") or last.startswith(("test_", "conftest")) or last.endswith("_support")


@pytest.fixture(autouse=True)
def _fast_lane_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Outside the slow lane, a pipeline stage run in process (one imported before the test starts, as a test
    module's imports are) or a heavy command fails the test with SLOW_HINT. A test running a suite of its own
    (pytester) is left to that suite's guard."""
    if request.node.get_closest_marker("slow") is not None or "pytester" in request.fixturenames:
        yield
        return
    test = request.node.nodeid

    def refuse(what: str) -> None:
        pytest.fail(f"{test} is not marked slow but {what}: {SLOW_HINT}", pytrace=False)

    for module_name, function_name in STAGE_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        original = getattr(module, function_name, None)
        if original is None:
            continue

        def stage(*args: Any, _name: str = function_name, **kwargs: Any) -> Any:
            refuse(f"it runs {_name}()")

        for name, holder in list(sys.modules.items()):  # `from ... import build` bound it in other modules too
            if _ours(name) and getattr(holder, function_name, None) is original:
                monkeypatch.setattr(holder, function_name, stage)
    original_init = subprocess.Popen.__init__

    def guarded_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        reason = heavy_command(args)
        if reason is not None:
            refuse(reason)
        original_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    yield


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
