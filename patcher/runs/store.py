"""Writing run and export directories safely: atomic files and directories, locked outputs, staging for resumable
jobs, stale partials of killed runs cleaned, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.errors import PatcherError
from patcher.runs.failures import write_errors
from patcher.runs.locks import check_name, hidden_sibling, output_lock

__all__ = ["output_lock", "write_errors"]  # re-exported: stages import them from here


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The {"sha256", "bytes"} entry a manifest keeps for one file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


ATOMIC_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what `atomic_file` names its temporaries


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `path` to write; rename it over `path` only if the block succeeds."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_atomic_leftovers(directory: Path) -> list[Path]:
    """Remove the temporaries of `atomic_file` writers killed mid-write in `directory`; returns what was removed.

    Call it only while holding the lock of whatever writes into `directory`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [entry for entry in directory.iterdir() if ATOMIC_TEMPORARY.match(entry.name) and entry.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def write_text(path: Path, text: str) -> None:
    """Write a text file whole or not at all (temporary sibling, then an atomic rename)."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Write JSON whole or not at all."""
    write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; rename it into place only if the block succeeds.

    Replacing an existing `final` renames it to a hidden `.old-` sibling first; `clean_stale` puts it back
    when a process is killed between the two renames, so `final` is always either the old or the new whole.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise PatcherError(f"{final} already exists: choose another --out or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(final, f".partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        backup = hidden_sibling(final, f".old-{uuid.uuid4().hex[:8]}")
        os.replace(final, backup)
        os.replace(staging, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, final)


def _siblings(final: Path, kind: str) -> list[Path]:
    if not final.parent.is_dir():
        return []
    prefix = hidden_sibling(final, f".{kind}-").name
    return [entry for entry in final.parent.iterdir() if entry.name.startswith(prefix)]


def clean_stale(final: Path) -> list[Path]:
    """Remove what a killed writer of `final` left beside it (`.partial-*`, `.old-*`); returns what was removed.

    Call it only while holding `output_lock(final)`. A missing `final` with an `.old-` sibling (killed between
    the two renames of a replacement) gets the old directory back.
    """
    final = Path(final)
    olds = sorted(_siblings(final, "old"), key=lambda path: path.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
    removed = [*_siblings(final, "partial"), *olds]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


@contextmanager
def output_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_directory` for a stage's output: locked while written, stale partials of killed runs removed first,
    and write faults (ENOSPC, EFBIG, ...) turned into one-line PatcherErrors with the staging removed."""
    final = Path(final)
    check_name(final)
    with write_errors(final), output_lock(final):
        clean_stale(final)
        with atomic_directory(final, overwrite) as staging, write_errors(final, staging):
            yield staging


STAGING_FINGERPRINT = "options.json"


def staging_path(out: Path) -> Path:
    """The fixed hidden sibling where a long job builds `out`, so that `--resume` can find it."""
    return hidden_sibling(out, ".partial")


def _check_resumable(staging: Path, fingerprint: dict[str, Any]) -> None:
    saved = staging / STAGING_FINGERPRINT
    if not saved.is_file():
        raise PatcherError(f"nothing to resume at {staging}: run the same command without --resume")
    try:
        same = json.loads(saved.read_text()) == json.loads(json.dumps(fingerprint, default=str))
    except json.JSONDecodeError:
        same = False
    if not same:
        raise PatcherError(f"{staging} was started with other options: rerun with those or drop --resume")


def prepare_staging(out: Path, fingerprint: dict[str, Any], resume: bool) -> Path:
    """A staging directory for `out`: the interrupted one when resuming with the same options, else a fresh one."""
    staging = staging_path(out)
    if resume:
        _check_resumable(staging, fingerprint)
        return staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json(staging / STAGING_FINGERPRINT, json.loads(json.dumps(fingerprint, default=str)))
    return staging


def finish_staging(staging: Path, out: Path) -> None:
    """Drop the resume bookkeeping and rename the finished staging directory into place."""
    if out.exists():
        raise PatcherError(f"{out} appeared while this job ran: the result stays in {staging}")
    (staging / STAGING_FINGERPRINT).unlink(missing_ok=True)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    staging.rename(out)


@dataclass
class RunStaging:
    """The staging directory of a resumable job's output, as `run_staging` hands it to the job."""

    out: Path
    fingerprint: dict[str, Any]
    resume: bool
    writer: bool = True
    path: Path = field(init=False)
    opened: bool = False

    def __post_init__(self) -> None:
        self.path = staging_path(self.out)

    def open(self) -> Path:
        """Create the staging directory (or take up the interrupted one with --resume); the writer only."""
        if self.writer and not self.opened:
            with write_errors(self.out, self.path):
                self.path = prepare_staging(self.out, self.fingerprint, self.resume)
            self.opened = True
        return self.path


@contextmanager
def run_staging(out: Path, fingerprint: dict[str, Any], resume: bool, writer: bool = True) -> Iterator[RunStaging]:
    """Guard a resumable job writing `out`: locked while it runs, refused at once if `out` exists or there is
    nothing to resume, the staging directory created only when the job calls `open()` (after its data is found),
    renamed into place when the block succeeds and removed when it fails; kept for `--resume` when interrupted
    (KeyboardInterrupt, or kill -9). Write faults become one-line PatcherErrors. `writer=False` (a torchrun rank
    other than 0) only checks and yields the path."""
    out = Path(out)
    check_name(out)
    staging = RunStaging(out, fingerprint, resume, writer)
    if out.exists():
        raise PatcherError(f"{out} already exists: pass another --out or remove it")
    if not writer:
        yield staging
        return
    with write_errors(out), output_lock(out):
        if out.exists():
            raise PatcherError(f"{out} already exists: pass another --out or remove it")
        clean_stale(out)
        if resume:
            _check_resumable(staging.path, fingerprint)
        try:
            with write_errors(out, staging.path):
                yield staging
        except KeyboardInterrupt:
            raise
        except BaseException:
            if staging.opened:
                shutil.rmtree(staging.path, ignore_errors=True)
            raise
        if staging.opened:
            finish_staging(staging.path, out)


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to a training log."""
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _log_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def trim_log(path: Path, step: int) -> None:
    """Keep only the (whole) log lines up to the step training resumes from; rewritten atomically."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if (at := _log_step(line)) is not None and at <= step]
    write_text(path, "".join(f"{line}\n" for line in lines))


