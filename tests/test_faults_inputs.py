"""Hostile inputs to the CLI: a malicious pickle as --pretrained (refused, never run), a file that is no
checkpoint, an output name no filesystem takes, a damaged resume record: one `error:` line, exit 2, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from faults_support import BUILD, hidden, run_patcher, the_error_line
from typer.testing import CliRunner

from patcher.cli import app

runner = CliRunner()


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_in_one_line_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, checkpoint)
    runs = tmp_path / "runs"
    result = run_patcher(*[a if a != "none" else str(checkpoint) for a in BUILD], "--out", str(runs / "r"))
    assert result.returncode == 2, result.stderr
    line = the_error_line(result.stderr)
    assert str(checkpoint) in line and "pickled Python objects" in line and "safetensors" in line, line
    assert not marker.exists() and not runs.exists()


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "notes.pt"
    checkpoint.write_text("just text\n")
    result = runner.invoke(app, [*[a if a != "none" else str(checkpoint) for a in BUILD], "--out",
                                 str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "is not a usable patcher-tiny checkpoint" in the_error_line(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]


@pytest.mark.parametrize("command", ["build", "export"])
def test_an_output_name_of_300_characters_is_refused_before_any_work(tmp_path: Path, command: str,
                                                                      tiny_run: Path) -> None:
    out = tmp_path / ("r" * 300)
    arguments = [*BUILD, "--out", str(out)] if command == "build" else ["export", str(tiny_run), "--out", str(out)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    line = the_error_line(result.output)  # export's reuse check meets the name first, as the OS's ENAMETOOLONG
    assert "is 300 bytes long, more than the 255" in line or ("file name too long" in line and "shorter" in line)
    assert list(tmp_path.iterdir()) == []


def test_a_long_but_valid_name_keeps_short_hidden_siblings(tmp_path: Path) -> None:
    from patcher.base.locks import lock_path
    from patcher.base.staging import resumable_path, staged_output

    out = tmp_path / ("r" * 250)
    assert len(lock_path(out).name) <= 255 and len(resumable_path(out).name) <= 255
    with staged_output(out) as staging:
        (staging.open() / "file").write_text("x")
    assert (out / "file").read_text() == "x" and hidden(tmp_path) == []


def test_a_damaged_resume_record_is_one_error_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    staging = tmp_path / ".run.partial"
    staging.mkdir()
    (staging / "options.json").write_text('{"task": "dig')  # cut short by a kill
    result = runner.invoke(app, [*BUILD, "--out", str(out), "--resume"])
    assert result.exit_code == 2
    assert "was started with other options" in the_error_line(result.output)
