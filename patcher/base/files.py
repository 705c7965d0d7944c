"""Files written whole or not at all, read back with a check of their format, and identified by hash."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError

ATOMIC_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what `atomic_file` names its temporaries


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """A file's sha256 and size, as manifests and export records list them."""

    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        """The record of a file on disk."""
        return cls(sha256_file(path), Path(path).stat().st_size)


def now_iso() -> str:
    """The current UTC time in ISO-8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def fsync_file(path: Path) -> None:
    """Flush a file's data to its device (what a rename must not overtake, or a power cut leaves it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename into it, a file created in it) to its device."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory below `root`, and `root` itself, before the tree is renamed into place."""
    for folder, _, names in os.walk(root):
        for name in names:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_file(Path(folder) / name)
        fsync_directory(Path(folder))


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `path` to write; if the block succeeds, flush it, rename it over `path`
    and flush the directory, so that after a power cut `path` is the old file or the new one, never empty."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
        fsync_directory(path.parent)
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


def read_json_record(path: Path, expected_format: str, remedy: str) -> dict[str, Any]:
    """A JSON object whose "format" must be `expected_format`; PatcherError (ending with `remedy`) otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise PatcherError(f"{path} is not valid JSON ({error.msg}): {remedy}") from error
    except UnicodeDecodeError:
        raise PatcherError(f"{path} is not a text file: {remedy}") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else None
        raise PatcherError(f"{path} has format {found!r}, expected {expected_format!r}: {remedy}")
    return data


def append_json_line(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to a log."""
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def trim_json_lines(path: Path, step: int) -> None:
    """Keep only the (whole) lines of a step log up to `step`; rewritten atomically."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if (at := _line_step(line)) is not None and at <= step]
    write_text(path, "".join(f"{line}\n" for line in lines))
