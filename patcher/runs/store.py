"""Writing run and export directories safely: atomic files and directories, staging for resumable jobs, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patcher.errors import PatcherError


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


def write_text(path: Path, text: str) -> None:
    """Write a text file whole or not at all (temporary sibling, then an atomic rename)."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Write JSON whole or not at all."""
    write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target` while a stage writes it; PatcherError if another process holds it.

    The lock is `flock` on a hidden sibling file, so it is released by the kernel when the holder dies,
    even by kill -9: a stale lock can never block the next run.
    """
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PatcherError(f"{target} is being written by {holder}: wait for it to finish, "
                               "or choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; rename it into place only if the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise PatcherError(f"{final} already exists: choose another --out or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, backup)
        os.replace(staging, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, final)


STAGING_FINGERPRINT = "options.json"


def staging_path(out: Path) -> Path:
    """The fixed hidden sibling where a long job builds `out`, so that `--resume` can find it."""
    return out.with_name(f".{out.name}.partial")


def prepare_staging(out: Path, fingerprint: dict[str, Any], resume: bool) -> Path:
    """A staging directory for `out`: the interrupted one when resuming with the same options, else a fresh one."""
    staging = staging_path(out)
    if resume:
        saved = staging / STAGING_FINGERPRINT
        if not saved.is_file():
            raise PatcherError(f"nothing to resume at {staging}: run the same command without --resume")
        if json.loads(saved.read_text()) != json.loads(json.dumps(fingerprint, default=str)):
            raise PatcherError(f"{staging} was started with other options: rerun with those or drop --resume")
        return staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json(staging / STAGING_FINGERPRINT, json.loads(json.dumps(fingerprint, default=str)))
    return staging


def finish_staging(staging: Path, out: Path) -> None:
    """Drop the resume bookkeeping and rename the finished staging directory into place."""
    (staging / STAGING_FINGERPRINT).unlink(missing_ok=True)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    if out.exists():
        raise PatcherError(f"{out} appeared while this job ran: the result stays in {staging}")
    staging.rename(out)


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to a training log."""
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def trim_log(path: Path, step: int) -> None:
    """Keep only the log lines up to the step training resumes from."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in lines))


