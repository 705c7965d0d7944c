"""kill -9 of the real CLI at many moments of build and export: the output is whole or absent, the next run cleans
what the killed one left, and its files are byte-identical to an uninterrupted run's (a resumed build included)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import BUILD, ForkedCLI, assert_complete_export, assert_complete_run, hidden, wait_for

from patcher.runs.locks import lock_path, output_lock

pytestmark = pytest.mark.slow
KILLS = 6


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedCLI]:
    forked = ForkedCLI(tmp_path_factory.mktemp("cli"))
    yield forked
    forked.close()


def timed(cli: ForkedCLI, arguments: list[str], anchor: Path) -> tuple[float, float]:
    """Run the CLI to the end: (seconds until `anchor` existed, seconds in all)."""
    started = time.perf_counter()
    child = cli.start(*arguments)
    first = wait_for(lambda: anchor.exists() or child.poll() is not None, timeout=300, interval=0.002)
    wait_for(lambda: child.poll() is not None, timeout=300)
    assert child.poll() == 0, child.stderr()
    return first, time.perf_counter() - started


def kill_at(cli: ForkedCLI, moment: int, arguments: list[str], anchor: Path, times: tuple[float, float]) -> None:
    """Start the CLI and kill -9 it: moment 0 halfway to when `anchor` appeared in the reference run, moment k > 0
    at k/(KILLS - 1) of the reference's time after `anchor` appeared, counted from when it appears in this run."""
    first, total = times
    child = cli.start(*arguments)
    if moment == 0:
        time.sleep(0.5 * first)
    else:
        wait_for(lambda: anchor.exists() or child.poll() is not None, timeout=300, interval=0.002)
        time.sleep((total - first) * moment / (KILLS - 1))
    child.kill9()


@pytest.fixture(scope="module")
def reference(cli: ForkedCLI, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted build and export through the CLI, with how long each took."""
    root = tmp_path_factory.mktemp("reference")
    run, export = root / "run", root / "export"
    build_times = timed(cli, [*BUILD, "--out", str(run)], root / ".run.partial")
    export_times = timed(cli, ["export", str(run), "--out", str(export)], root / ".export.lock")
    return {"run": run, "weights": weights_of(assert_complete_run(run)), "build_times": build_times,
            "onnx": assert_complete_export(export), "export_times": export_times}


def weights_of(hashes: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in hashes.items() if name.startswith("models/")}


def assert_unlocked(target: Path) -> None:
    """A lock file a killed process left is free: this process can take it."""
    if lock_path(target).exists():
        with output_lock(target):
            pass


def test_kill9_during_build_leaves_whole_or_nothing_and_a_rerun_finishes(cli: ForkedCLI, reference: dict,
                                                                         tmp_path: Path) -> None:
    seen = []
    for moment in range(KILLS):
        out = tmp_path / f"run{moment}"
        staging = tmp_path / f".{out.name}.partial"
        kill_at(cli, moment, [*BUILD, "--out", str(out)], staging, reference["build_times"])
        left = set(hidden(tmp_path))
        assert left <= {staging.name, f".{out.name}.lock"}, left
        assert_unlocked(out)
        if out.exists():
            seen.append("complete")
            assert staging.name not in left
            assert weights_of(assert_complete_run(out)) == reference["weights"]
            continue
        resumable = (staging / "options.json").is_file()
        seen.append("checkpointed" if any(staging.glob("checkpoints/*/checkpoint.pt"))
                    else "staging" if staging.exists() else "nothing")
        code, stderr = cli.run(*BUILD, "--out", str(out), *(["--resume"] if resumable else []))
        assert code == 0, stderr
        assert hidden(tmp_path) == [], hidden(tmp_path)
        assert weights_of(assert_complete_run(out)) == reference["weights"], (moment, seen)
    assert seen[0] == "nothing" and {"staging", "checkpointed"} & set(seen), seen


def test_kill9_after_a_checkpoint_resumes_to_the_same_bytes(cli: ForkedCLI, reference: dict, tmp_path: Path) -> None:
    out, staging = tmp_path / "run", tmp_path / ".run.partial"
    child = cli.start(*BUILD, "--out", str(out))
    wait_for(lambda: any(staging.glob("checkpoints/*/checkpoint.pt")), timeout=300, interval=0.002)
    child.kill9()
    assert not out.exists() and (staging / "options.json").is_file()
    code, stderr = cli.run(*BUILD, "--out", str(out), "--resume")
    assert code == 0, stderr
    assert weights_of(assert_complete_run(out)) == reference["weights"]
    assert hidden(tmp_path) == []


def test_kill9_during_export_leaves_whole_or_nothing_and_the_next_export_cleans_up(cli: ForkedCLI, reference: dict,
                                                                                  tmp_path: Path) -> None:
    seen = []
    for moment in range(KILLS):
        out = tmp_path / f"onnx{moment}"
        kill_at(cli, moment, ["export", str(reference["run"]), "--out", str(out)], tmp_path / f".{out.name}.lock",
                reference["export_times"])
        left = hidden(tmp_path)
        assert all(name.startswith((f".{out.name}.partial-", f".{out.name}.lock")) for name in left), left
        assert_unlocked(out)
        if out.exists():
            seen.append("complete")
            assert assert_complete_export(out) == reference["onnx"]
        else:
            seen.append("partial" if any(".partial-" in name for name in left) else "nothing")
        code, stderr = cli.run("export", str(reference["run"]), "--out", str(out))
        assert code == 0, stderr
        assert hidden(tmp_path) == [], hidden(tmp_path)
        assert assert_complete_export(out) == reference["onnx"]  # the same run exports to the same bytes
    assert seen[0] == "nothing" and "partial" in seen, seen
