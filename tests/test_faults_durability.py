"""Nothing is renamed into place before it is on the device: a syscall trace (strace) of real `patcher` commands
shows every file or directory flushed before its rename and the directory it lands in flushed after, so that a
power cut leaves the old version or the new one, never an empty file under a final name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from patcher.base.files import ATOMIC_TEMPORARY

pytestmark = pytest.mark.skipif(shutil.which("strace") is None and os.environ.get("CI") != "true",
                                 reason="needs strace (scripts/setup.sh installs it)")
TRACED = "fsync,fdatasync,rename,renameat,renameat2"
CALL = re.compile(r"^\d+\s+(?P<name>fsync|fdatasync|rename|renameat|renameat2)\((?P<args>.*)\)\s+= 0")
FD_PATH = re.compile(r"^\d+<(?P<path>[^>]*)>")
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Event:
    """One successful call: an fsync of a path, or a rename of `path` to `target`."""

    kind: str
    path: str
    target: str = ""


def events(trace: Path) -> list[Event]:
    """The fsyncs and renames of a `strace -f -y` log, in order."""
    found = []
    for line in trace.read_text().splitlines():
        match = CALL.match(line)
        if not match:
            continue
        name, args = match["name"], match["args"]
        if name in ("fsync", "fdatasync"):
            fd = FD_PATH.match(args)
            if fd:
                found.append(Event("fsync", fd["path"]))
        else:
            paths = QUOTED.findall(args)
            if len(paths) == 2:
                found.append(Event("rename", paths[0], paths[1]))
    return found


def unflushed_renames(trace: Path, root: Path) -> list[str]:
    """Renames into `root` whose source was not flushed before, or whose directory was not flushed after."""
    log = events(trace)
    problems = []
    for index, event in enumerate(log):
        if event.kind != "rename" or not event.target.startswith(str(root)):
            continue
        if ATOMIC_TEMPORARY.match(os.path.basename(event.target)):
            continue  # a library writing our temporary by its own rename: the temporary is flushed before its own
        before = {e.path for e in log[:index] if e.kind == "fsync"}
        after = {e.path for e in log[index + 1 :] if e.kind == "fsync"}
        if event.path not in before:
            problems.append(f"{event.path} renamed to {event.target} unflushed")
        if os.path.dirname(event.target) not in after:
            problems.append(f"{os.path.dirname(event.target)} not flushed after {event.target} arrived")
    return problems


def traced(arguments: list[str], trace: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """`python -m patcher ...` under strace, following every process it starts."""
    command = ["strace", "-f", "--seccomp-bpf", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(trace),
               sys.executable, "-m", "patcher", *arguments]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATCHER_CACHE": str(cache)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_build_and_export_flush_before_they_rename(tiny_clip: Path, tmp_path: Path) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    build = traced(["build", "--task", "digits", "--support", "count-objects", "--model", f"local-dir:{tiny_clip}",
                    "--pretrained", "none", "--steps", "4", "--batch-size", "16", "--warmup-steps", "1",
                    "--checkpoint-every", "2", "--data-mode", "stream", "--workers", "0", "--device", "cpu",
                    "--out", str(run)], tmp_path / "build.trace", cache)
    assert build.returncode == 0, build.stderr[-2000:]
    export = traced(["export", str(run), "--fp16"], tmp_path / "export.trace", cache)
    assert export.returncode == 0, export.stderr[-2000:]
    for name in ("build", "export"):
        renames = [e for e in events(tmp_path / f"{name}.trace") if e.kind == "rename"
                   and e.target.startswith(str(tmp_path))]
        assert renames, f"{name} renamed nothing into place: the trace did not see it"
        assert unflushed_renames(tmp_path / f"{name}.trace", tmp_path) == [], name
    built = [e.target for e in events(tmp_path / "build.trace") if e.kind == "rename"]
    assert str(run) in built and any(t.endswith("checkpoint.pt") for t in built)  # the run, and its checkpoints
    assert any(t.endswith("store.json") or "/images/" in t for t in built)  # the image cache


def test_the_check_sees_an_unflushed_rename(tmp_path: Path) -> None:
    script = ("import os, sys; open(sys.argv[1] + '.tmp', 'w').write('x'); "
              "os.replace(sys.argv[1] + '.tmp', sys.argv[1])")
    trace = tmp_path / "plain.trace"
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2", "-o", str(trace),
                    sys.executable, "-c", script, str(tmp_path / "file")], check=True)
    assert len(unflushed_renames(trace, tmp_path)) == 2


def test_patcher_triton_flushes_before_it_renames_the_journal_included(tiny_export: Path, tmp_path: Path) -> None:
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    first = traced(["triton", str(tiny_export), "--repo", str(repo)], tmp_path / "first.trace", cache)
    assert first.returncode == 0, first.stderr[-2000:]
    again = traced(["triton", str(tiny_export), "--repo", str(repo), "--max-batch-size", "8"],
                   tmp_path / "again.trace", cache)  # configs only: no new version, the changed configs replaced
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("first", "again"):
        trace = tmp_path / f"{name}.trace"
        renamed = [e.target for e in events(trace) if e.kind == "rename" and e.target.startswith(str(repo))]
        assert str(repo / ".patcher-journal.json") in renamed, name  # the journal's commit is a rename
        assert unflushed_renames(trace, repo) == [], name
    renamed = [e.target for e in events(tmp_path / "first.trace") if e.kind == "rename"]
    assert str(repo / "digits_patched" / "1") in renamed and str(repo / "digits" / "config.pbtxt") in renamed
