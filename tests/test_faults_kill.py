"""kill -9 of the real CLI at many moments of build and export (read from what it has written so far): the output
is whole or absent, the next run cleans what the killed one left, and its files are byte-identical to an
uninterrupted run's (a build resumed from a checkpoint included). Also: the same build twice, the same export twice."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults_support import BUILD, ForkedCLI, assert_complete_export, assert_complete_run, hidden, wait_for

from patcher.base.locks import lock_path, output_lock

pytestmark = pytest.mark.slow
TIMES = ("created", "timings_s")  # export.json fields that carry times by design


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedCLI]:
    forked = ForkedCLI(tmp_path_factory.mktemp("cli"))
    yield forked
    forked.close()


def kill_when(cli: ForkedCLI, arguments: list[str], moment: Callable[[], bool]) -> None:
    """Start the CLI and kill -9 it as soon as `moment()` holds (or when it has ended by itself)."""
    child = cli.start(*arguments)
    wait_for(lambda: moment() or child.poll() is not None, timeout=300, interval=0.002)
    child.kill9()


def exists(pattern: str, folder: Path) -> Callable[[], bool]:
    return lambda: any(folder.glob(pattern))


def build_moments(staging: Path) -> dict[str, Callable[[], bool]]:
    """Moments in a build's life, read from what it has written so far."""
    started = time.perf_counter()
    return {
        "importing": lambda: time.perf_counter() - started > 0.3,
        "staging created": exists("options.json", staging),
        "first checkpoint": exists("checkpoints/*/checkpoint.pt", staging),
        "training done": lambda: '"step": 40' in read(staging / "train.log"),
        "writing classifiers": exists("models", staging),
        "manifest written": exists("manifest.json", staging),
    }


def export_moments(parent: Path, name: str) -> dict[str, Callable[[], bool]]:
    """Moments in an export's life: locked, staging made, tracing, each model written, export.json written."""
    partial = f".{name}.partial-*"
    return {
        "locked": exists(f".{name}.lock", parent),
        "staging created": exists(partial, parent),
        "tracing": exists(f"{partial}/.patched.traced.onnx", parent),
        "patched written": exists(f"{partial}/patched.onnx", parent),
        "zeroshot written": exists(f"{partial}/zeroshot.onnx", parent),
        "export.json written": exists(f"{partial}/export.json", parent),
    }


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def reference(cli: ForkedCLI, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted build and export through the CLI."""
    root = tmp_path_factory.mktemp("reference")
    run, export = root / "run", root / "export"
    for arguments in ([*BUILD, "--out", str(run)], ["export", str(run), "--out", str(export)]):
        code, stderr = cli.run(*arguments)
        assert code == 0, stderr
    return {"run": run, "weights": weights_of(assert_complete_run(run)), "export": export,
            "onnx": assert_complete_export(export)}


def weights_of(hashes: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in hashes.items() if name.startswith("models/")}


def assert_unlocked(target: Path) -> None:
    """A lock file a killed process left is free: this process can take it."""
    if lock_path(target).exists():
        with output_lock(target):
            pass


def test_kill9_during_build_leaves_whole_or_nothing_and_a_rerun_finishes(cli: ForkedCLI, reference: dict,
                                                                         tmp_path: Path) -> None:
    seen: dict[str, str] = {}
    for number, moment in enumerate(build_moments(tmp_path)):
        out = tmp_path / f"run{number}"
        staging = tmp_path / f".{out.name}.partial"
        kill_when(cli, [*BUILD, "--out", str(out)], build_moments(staging)[moment])
        left = set(hidden(tmp_path))
        assert left <= {staging.name, f".{out.name}.lock"}, left
        assert_unlocked(out)
        if out.exists():
            seen[moment] = "complete"
            assert staging.name not in left
            assert weights_of(assert_complete_run(out)) == reference["weights"]
            continue
        resumable = (staging / "options.json").is_file()
        seen[moment] = ("checkpointed" if any(staging.glob("checkpoints/*/checkpoint.pt"))
                        else "staging" if staging.exists() else "nothing")
        code, stderr = cli.run(*BUILD, "--out", str(out), *(["--resume"] if resumable else []))
        assert code == 0, stderr
        assert hidden(tmp_path) == [], hidden(tmp_path)
        assert weights_of(assert_complete_run(out)) == reference["weights"], (moment, seen)
    # the early kills really hit those moments (and the checkpointed one was resumed to the same bytes)
    assert seen["importing"] == "nothing" and seen["first checkpoint"] == "checkpointed", seen
    assert seen["staging created"] in ("staging", "checkpointed"), seen


def test_kill9_during_export_leaves_whole_or_nothing_and_the_next_export_cleans_up(cli: ForkedCLI, reference: dict,
                                                                                  tmp_path: Path) -> None:
    seen: dict[str, str] = {}
    for number, moment in enumerate(export_moments(tmp_path, "onnx")):
        out = tmp_path / f"onnx{number}"
        kill_when(cli, ["export", str(reference["run"]), "--out", str(out)],
                  export_moments(tmp_path, out.name)[moment])
        left = hidden(tmp_path)
        assert all(name.startswith((f".{out.name}.partial-", f".{out.name}.lock")) for name in left), left
        assert_unlocked(out)
        if out.exists():
            seen[moment] = "complete"
            assert assert_complete_export(out) == reference["onnx"]
        else:
            seen[moment] = "partial" if any(".partial-" in name for name in left) else "nothing"
        code, stderr = cli.run("export", str(reference["run"]), "--out", str(out))
        assert code == 0, stderr
        assert hidden(tmp_path) == [], hidden(tmp_path)
        assert assert_complete_export(out) == reference["onnx"]  # the same run exports to the same bytes
    assert seen["locked"] == "nothing" and list(seen.values()).count("partial") >= 3, seen


def without_times(record: dict) -> dict:
    """export.json without the fields that carry times by design."""
    return {key: value for key, value in record.items() if key not in TIMES}


def test_the_same_build_twice_and_the_same_export_twice_write_the_same_bytes(cli: ForkedCLI, reference: dict,
                                                                             tmp_path: Path) -> None:
    """Every file of two identical builds byte-identical, manifest and train.log included (times live apart, in
    timings.json); the same run exported twice, and the two builds' exports, byte-identical ONNX files."""
    twin, again, twin_export = tmp_path / "twin" / "run", tmp_path / "again", tmp_path / "twin-export"
    for arguments in ([*BUILD, "--out", str(twin)], ["export", str(reference["run"]), "--out", str(again)],
                      ["export", str(twin), "--out", str(twin_export)]):
        code, stderr = cli.run(*arguments)
        assert code == 0, stderr
    ours, theirs = assert_complete_run(reference["run"]), assert_complete_run(twin)
    assert {"models/patched.safetensors", "open_clip_config.json", "alpha_curve.png", "train.log"} <= set(ours)
    assert ours == theirs
    assert (reference["run"] / "manifest.json").read_bytes() == (twin / "manifest.json").read_bytes()
    assert json.loads((twin / "timings.json").read_text())["timings_s"]["total"] > 0
    assert len((twin / "train.log").read_text().splitlines()) > 1

    assert assert_complete_export(again) == reference["onnx"]
    records = [json.loads((folder / "export.json").read_text()) for folder in (reference["export"], again)]
    assert without_times(records[0]) == without_times(records[1])
    for name in ("patched.onnx", "zeroshot.onnx"):
        assert (reference["export"] / name).read_bytes() == (twin_export / name).read_bytes()
