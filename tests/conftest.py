"""Shared fixtures (a tiny real run, built once per test run with the real `patcher build`) and the lanes.

The fast lane (`pytest -m "not slow"`, scripts/test-fast.sh) builds no model and starts no server:
- a test that uses a model-building fixture (MODEL_FIXTURES, directly or through another fixture), or that
  SLOW_TESTS names for its cost, is marked slow here, at collection;
- a test outside the slow lane that builds a model in process (open_clip.create_model, which every model of
  patcher comes from) or starts a heavy process (tritonserver, torchrun, moto_server, a benchmark script) fails
  with one line saying to mark it slow (`_fast_lane_guard`). tests/test_lanes.py checks both rules.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ("pytester", "cpu_report")  # pytester: tests/test_lanes.py runs small suites under the rules below

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows torch many times over
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL_FIXTURES = frozenset({"tiny_clip", "tiny_run", "tiny_export"})  # every shared model is built through these
HEAVY_PROGRAMS = ("tritonserver", "torchrun", "moto_server")
# Tests slow by cost though they use no model fixture: each builds a model in process or starts Python processes
# that import torch and open_clip (the CLI's bad-input checks, "the same in another process"), 10-45 s each on the
# 2 shared cores of 2026-12-07 (pytest --durations); without them the fast lane is about a minute.
SLOW_TESTS = (
    "tests/test_build.py::test_bad_input_is_one_line_exit_2_and_writes_nothing",
    "tests/test_build.py::test_empty_folder_dataset_is_refused_and_nothing_is_written",
    "tests/test_case_studies_tasks.py::test_items_are_seeded_and_do_not_depend_on_the_process",
    "tests/test_compat.py::test_compat_does_nothing_where_torchvision_imports_on_its_own",
    "tests/test_data_streaming.py::test_streamed_and_in_memory_evaluation_agree",
    "tests/test_deploy.py::test_bad_input_is_one_error_line",
    "tests/test_deploy.py::test_manifests_for_an_s3_repository_validate",
    "tests/test_faults_bitrot.py::test_a_fill_killed_by_kill_9_leaves_a_partial_the_next_build_removes",
    "tests/test_faults_data.py::test_the_cli_says_one_line_exits_2_and_writes_nothing",
    "tests/test_faults_inputs.py::test_a_malicious_pickle_is_refused_in_one_line_and_never_runs",
    "tests/test_faults_inputs.py::test_a_file_that_is_no_checkpoint_is_refused",
    "tests/test_finetune_scale.py",
    "tests/test_models_offline.py",
    "tests/test_objectstore.py::test_uploads_are_verified_and_writers_exclude_each_other",
    "tests/test_pretrain.py",
    "tests/test_printed_digits.py::test_parts_are_balanced_and_the_same_on_every_load",
    "tests/test_task_vectors.py::test_mismatched_architectures_are_refused",
    "tests/test_tasks_offline.py::test_splits_are_the_same_in_another_process",
    "tests/test_tasks_registry.py::test_importing_the_registry_touches_neither_torchvision_nor_disk",
    "tests/test_tokenizer.py::test_token_for_token_with_open_clip",
    "tests/test_training.py::test_resume_reaches_the_same_weights",
    "tests/test_training.py::test_finetuning_lowers_the_loss_through_a_frozen_head",
)
# The modules of the longest tests (pytest --durations, 2 shared cores, 2026-12-07), started first and each kept
# together (its module fixtures set up once a worker). Under xdist's default scheduling they all landed in the first
# worker's first chunk and ran one after another at the end; with --dist worksteal (pyproject.toml) a worker that
# runs dry takes half of the other's queue from its end, so the long tests start early and the light ones fill in.
LONGEST_FIRST = (
    "tests/test_objectstore.py",
    "tests/test_distributed.py",
    "tests/test_warmup_verify.py",
    "tests/test_triton_faults.py",
    "tests/test_faults_kill.py",
    "tests/test_faults_fronts.py",
    "tests/test_faults_durability.py",
    "tests/test_faults_served_files.py",
    "tests/test_serving.py",
    "tests/test_faults_serving.py",
    "tests/test_bench.py",
)
SLOW_HINT = "mark it @pytest.mark.slow (the fast lane builds no model and starts no server)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test whose fixtures build a model (MODEL_FIXTURES, directly or through other fixtures) is slow, and so is
    one SLOW_TESTS names; LONGEST_FIRST's tests run first."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        uses_model = MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses_model or _relative(item.nodeid).startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_start_rank)  # stable: the rest keep their order


def _start_rank(item: pytest.Item) -> int:
    """Where LONGEST_FIRST puts a test's module (its position), after them the others."""
    nodeid = _relative(item.nodeid)
    return next((rank for rank, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))


def _relative(nodeid: str) -> str:
    """A node id from the repository root (pytest's are relative to where it runs: the root, or tests/)."""
    return nodeid if nodeid.startswith("tests/") else f"tests/{nodeid}"


def heavy_command(args: Any) -> str | None:
    """What makes a command heavy (a server, torchrun, a benchmark script), None for an ordinary one."""
    words = [str(word) for word in (args if isinstance(args, list | tuple) else str(args).split())]
    names = [Path(word).name for word in words]
    started = [name for name in names if name in HEAVY_PROGRAMS]
    modules = [after for before, after in itertools.pairwise(names) if before == "-m"]
    started += ["moto_server" for module in modules if module == "moto.server"]  # python -m moto.server
    if started:
        return f"it starts {started[0]}"
    if any(Path(word).parent.name == "bench" and word.endswith(".py") for word in words):
        return "it runs a benchmark script"
    return None


@pytest.fixture(autouse=True)
def _fast_lane_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Outside the slow lane, building a model in process (open_clip.create_model, once open_clip is imported, as
    test modules' imports do) or starting a heavy command fails the test with SLOW_HINT. A test running a suite
    of its own (pytester) is left to that suite's guard."""
    if request.node.get_closest_marker("slow") is not None or "pytester" in request.fixturenames:
        yield
        return
    test = request.node.nodeid

    def refuse(what: str) -> None:
        pytest.fail(f"{test} is not marked slow but {what}: {SLOW_HINT}", pytrace=False)

    open_clip = sys.modules.get("open_clip")  # every model patcher builds comes from open_clip.create_model
    if open_clip is not None:
        monkeypatch.setattr(open_clip, "create_model", lambda *args, **kwargs: refuse("it builds a model"))
    original_init = subprocess.Popen.__init__

    def guarded_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        reason = heavy_command(args)
        if reason is not None:
            refuse(reason)
        original_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's own model cache; given back at its end (a suite that pytester runs in this process sets its
    own, which must not outlive it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHER_CACHE", str(tmp_path_factory.mktemp("patcher-cache")))
        yield


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file (another process waits for it)."""
    descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _shared_by_workers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this run that every pytest-xdist worker of it sees (this session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Path]) -> Path:
    """`make(folder)`'s result, made once per run: the first xdist worker that needs it makes it under a lock, the
    others wait and get the same path (the fixtures below are read-only to the tests: they copy what they change)."""
    folder = _shared_by_workers(tmp_path_factory) / name
    done = folder.with_name(f"{name}.done")
    with _exclusive(folder.with_name(f"{name}.lock")):
        if done.is_file():
            return Path(done.read_text())
        folder.mkdir(exist_ok=True)
        result = Path(make(folder))
        done.write_text(str(result))
        return result


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP pretrained by `patcher pretrain` on Fashion-MNIST's val images and the digits 0-4 (~20 s), once per
    run, shared by the xdist workers. 200 steps: with the frozen uniform token table, 120 steps learnt the seen
    digits on 2 seeds of 4 (18.6, 1.3, 50.3, 27.2% zero-shot), 200 steps on all 3 tried (71.6, 29.3, 66.6%)."""
    from patcher.stages.pretrain import PretrainOptions, Source, pretrain
    from patcher.training.config import TrainConfig

    def make(folder: Path) -> Path:
        return pretrain(PretrainOptions(
            sources=[Source("fashion-mnist", "val", None, 0.6), Source("digits", "pretrain", [0, 1, 2, 3, 4], 0.4)],
            model="patcher-tiny",
            train=TrainConfig(steps=200, batch_size=64, lr=2e-3, weight_decay=0.1, warmup_steps=10,
                              checkpoint_every=100),
            device="cpu",
            out=folder / "tiny-clip",
        ))

    return _once_per_run(tmp_path_factory, "pretrain", make)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> Path:
    """A run directory from `patcher build` on digits (patch) and fashion-mnist (support) with the tiny CLIP, once per
    run."""
    from patcher.stages.build import BuildOptions, build
    from patcher.training.config import TrainConfig

    def make(folder: Path) -> Path:
        return build(BuildOptions(
            task="digits",
            support=["fashion-mnist"],
            model=f"local-dir:{tiny_clip}",
            pretrained=None,
            alpha="auto",
            # lr 3e-4: a fine-tune whose chosen alpha is above 0 here, so that patched and zero-shot differ
            train_config=TrainConfig(steps=30, batch_size=32, lr=3e-4, warmup_steps=3, checkpoint_every=10),
            device="cpu",
            out=folder / "tiny",
        ))

    return _once_per_run(tmp_path_factory, "runs", make)


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`patcher export` of the tiny run (fp32), once per run, shared by the tests that only read it."""
    from patcher.stages.export import ExportOptions, export_run

    return _once_per_run(tmp_path_factory, "tiny-export",
                         lambda folder: Path(export_run(tiny_run, ExportOptions(out=folder / "onnx"))))
