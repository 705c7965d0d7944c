"""Two real processes writing one output: the second is refused at once with one `error:` line naming the first,
which finishes intact (before the lock, the second deleted the first's staging directory mid-training)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from faults_support import BUILD, assert_complete_export, assert_complete_run, hidden, the_error_line, wait_for
from typer.testing import CliRunner

from patcher.base.locks import lock_path
from patcher.cli import app

pytestmark = pytest.mark.slow
LONG = [*BUILD, "--steps", "80", "--checkpoint-every", "1000"]  # a few seconds of work after the lock


def holder(target: Path, process: subprocess.Popen) -> str:
    """Wait until `process` holds the lock on `target`; the text it wrote there."""
    path = lock_path(target)
    wait_for(lambda: (path.exists() and f"pid {process.pid}" in path.read_text()) or process.poll() is not None,
             timeout=120)
    assert process.poll() is None, process.communicate()
    return path.read_text()


def test_a_second_build_into_the_same_out_is_refused_and_the_first_finishes(tmp_path: Path) -> None:
    from faults_support import command, environment

    out = tmp_path / "run"
    first = subprocess.Popen(command(*LONG, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=environment())
    assert holder(out, first) == f"pid {first.pid} (patcher build)"
    second = CliRunner().invoke(app, [*LONG, "--out", str(out)])  # another process: this one
    still_running = first.poll() is None
    assert second.exit_code == 2, second.output
    line = the_error_line(second.output)
    assert f"{out} is being written by pid {first.pid} (patcher build)" in line, line
    assert still_running, "the first build ended before the second was refused: the test proved nothing"
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_complete_run(out)
    assert hidden(tmp_path) == []


def test_a_second_export_into_the_same_out_is_refused_and_the_first_finishes(tiny_run: Path, tmp_path: Path) -> None:
    from faults_support import command, environment

    out = tmp_path / "onnx"
    first = subprocess.Popen(command("export", str(tiny_run), "--out", str(out), "--fp16"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=environment())
    holder(out, first)
    result = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(out), "--fp16"])
    still_running = first.poll() is None
    assert result.exit_code == 2, result.output
    assert f"is being written by pid {first.pid} (patcher export)" in result.output
    assert still_running
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_complete_export(out)
    assert hidden(tmp_path) == []
