"""A real full filesystem (a small tmpfs when the tests run as root, else RLIMIT_FSIZE): build and export end in one
`error:` line, exit 2, leave nothing on it, and succeed once there is room."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from faults_support import (
    BUILD,
    SmallFilesystem,
    assert_complete_export,
    assert_complete_run,
    everything,
    run_cli,
    the_error_line,
)
from typer.testing import CliRunner

from patcher.base.errors import PatcherError
from patcher.base.staging import Resume, staged_output
from patcher.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
SMALL = 512 * 1024  # options.json and train.log fit; a checkpoint or a classifier (~0.5-1 MB) does not


@pytest.fixture
def small(tmp_path: Path) -> Iterator[SmallFilesystem]:
    filesystem = SmallFilesystem(tmp_path / "small", SMALL)
    yield filesystem
    filesystem.remove()


def test_build_onto_a_full_disk_is_one_error_and_leaves_nothing(small: SmallFilesystem) -> None:
    out = small.folder / "run"
    result = run_cli(*BUILD, "--out", str(out), preexec_fn=small.limit)
    assert result.returncode == 2, result.stderr
    line = the_error_line(result.stderr)
    assert f"cannot write {out}" in line and small.fault in line and "nothing was written" in line, line
    assert everything(small.folder) == []  # no staging, no checkpoint.tmp, no lock file

    small.grow(64 << 20)
    result = runner.invoke(app, [*BUILD, "--out", str(out)])  # the same command, in this process, with room
    assert result.exit_code == 0, result.output
    assert_complete_run(out)
    assert everything(small.folder)[0] == "run"
    assert not [name for name in everything(small.folder) if name.startswith(".")]


def test_export_onto_a_full_disk_is_one_error_and_leaves_nothing(small: SmallFilesystem, tiny_run: Path) -> None:
    out = small.folder / "onnx"
    result = run_cli("export", str(tiny_run), "--out", str(out), preexec_fn=small.limit)
    assert result.returncode == 2, result.stderr
    line = the_error_line(result.stderr)
    assert f"cannot write {out}" in line and small.fault in line and ".onnx" in line, line
    assert everything(small.folder) == []

    small.grow(64 << 20)
    result = runner.invoke(app, ["export", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_complete_export(out)
    assert [name for name in everything(small.folder) if name.startswith(".")] == []


@pytest.fixture
def tmpfs(small: SmallFilesystem) -> SmallFilesystem:
    if not small.mounted:
        pytest.skip("mounting a tmpfs needs root: the CLI tests above cover this fault with RLIMIT_FSIZE")
    return small


def test_a_staged_output_turns_enospc_into_one_error(tmpfs: SmallFilesystem) -> None:
    final = tmpfs.folder / "out"
    with (pytest.raises(PatcherError, match=r"cannot write .*out \(no space left on device"),
          staged_output(final) as staging, open(staging.open() / "big.bin", "wb") as handle):
        for _ in range(2 * SMALL // 4096):
            handle.write(b"x" * 4096)
    assert everything(tmpfs.folder) == []


def test_torch_saves_failing_on_a_full_disk_are_recognised(tmpfs: SmallFilesystem) -> None:
    """torch.save reports a full disk as a RuntimeError naming no errno; the staging guard still knows it."""
    out = tmpfs.folder / "job"
    with (pytest.raises(PatcherError, match="no space left on device") as caught,
          staged_output(out, resume=Resume({"seed": 0})) as staging):
        torch.save({"weights": torch.zeros(2 * SMALL // 4)}, staging.open() / "checkpoint.pt")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert everything(tmpfs.folder) == []
