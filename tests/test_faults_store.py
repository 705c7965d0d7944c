"""The run store's guards on real files and processes: locks die with their holder, stale partials of killed
writers are cleaned (a directory killed mid-replacement comes back whole), torn log lines are dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from patcher.base.errors import PatcherError
from patcher.base.files import append_json_line, remove_atomic_leftovers, trim_json_lines, write_json
from patcher.base.locks import lock_path, output_lock
from patcher.base.staging import clean_stale, staged_output

HOLD = "import sys, time; from patcher.base.locks import output_lock\nwith output_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(120)"


def test_a_lock_dies_with_its_holder_even_by_kill_9(tmp_path: Path) -> None:
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(PatcherError, match=rf"{target} is being written by pid {holder.pid} "), \
                output_lock(target):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert lock_path(target).exists()  # left by the killed holder, but unlocked
    with output_lock(target), output_lock(target):  # taken over; reentrant in one process
        assert f"pid {os.getpid()}" in lock_path(target).read_text()
    assert not lock_path(target).exists()


def test_stale_partials_are_removed_and_a_half_replaced_directory_comes_back(tmp_path: Path) -> None:
    final = tmp_path / "onnx"
    (tmp_path / ".onnx.old-1a2b3c4d").mkdir()  # killed after renaming the old export away ...
    (tmp_path / ".onnx.old-1a2b3c4d" / "export.json").write_text("{}")
    (tmp_path / ".onnx.partial-5e6f7a8b").mkdir()  # ... or while writing the new one
    (tmp_path / ".onnxx.partial-00000000").mkdir()  # another output's: not ours to touch
    with output_lock(final):
        removed = clean_stale(final)
    assert [p.name for p in removed] == [".onnx.partial-5e6f7a8b"]
    assert (final / "export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".onnxx.partial-00000000", "onnx"]

WRITE_AND_HANG = "import sys, time; from patcher.base.files import atomic_file\nwith atomic_file(sys.argv[1]) as t:\n" \
                 "    t.write_text('half'); print('writing', flush=True); time.sleep(120)"


def test_the_temporary_of_a_write_killed_by_kill_9_is_removed_and_nothing_else(tmp_path: Path) -> None:
    journal = tmp_path / ".journal.json"
    write_json(journal, {"serial": 1})
    (tmp_path / ".other.tmp").write_text("not an atomic temporary")
    writer = subprocess.Popen([sys.executable, "-c", WRITE_AND_HANG, str(journal)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("..journal.json.")]
    assert len(leftovers) == 1 and json.loads(journal.read_text()) == {"serial": 1}
    assert [p.name for p in remove_atomic_leftovers(tmp_path)] == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == [".journal.json", ".other.tmp"]


def test_a_staged_output_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with staged_output(final) as staging:
        (staging.open() / "a").write_text("old")
    with pytest.raises(RuntimeError), staged_output(final, overwrite=True) as staging:
        (staging.open() / "a").write_text("new")
        raise RuntimeError("fails half-way")
    assert (final / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(PatcherError, match="already exists"), staged_output(final):
        pass


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    for step in (1, 11, 21):
        append_json_line(log, {"step": step, "loss": 1.0})
    with open(log, "a") as handle:
        handle.write('{"step": 31, "lo')  # the process died mid-write
    trim_json_lines(log, 20)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 11]
