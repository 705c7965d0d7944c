"""Working folders in the system's temporary directory that live exactly as long as the process that made them.

    with scratch_dir("patcher-bench-") as folder: ...     # removed on every exit the process survives

Each folder holds `.owner.lock`, flock-ed by its process for the folder's life; the kernel drops the lock when the
process dies, even by kill -9, so a later process that finds the folder unlocked knows it is stale and removes it
(`sweep_stale`, called before each new folder is made). Folders without the lock file (made by older versions) are
removed only when untouched for a day.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OWNER_LOCK = ".owner.lock"
LEGACY_AGE_S = 24 * 3600
YOUNG_S = 5.0  # a folder this new may not have its lock yet


@dataclass
class Scratch:
    """A folder this process owns while `fd` (its lock) is open."""

    path: Path
    fd: int | None

    def remove(self) -> None:
        """Delete the folder and release its lock (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _owned(path: Path) -> bool:
    """True while a live process holds the folder's lock (or may be about to take it)."""
    lock = path / OWNER_LOCK
    try:
        age = time.time() - path.stat().st_mtime
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return age < LEGACY_AGE_S if path.exists() else True
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return age < YOUNG_S  # unlocked: its owner died, unless it is so new that it has not locked it yet


def sweep_stale(prefix: str, root: Path | None = None) -> list[Path]:
    """Remove `prefix*` folders and files in the temporary directory whose owning process is gone."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for path in sorted(root.glob(f"{prefix}*")):
        if path.is_symlink() or not path.is_dir():
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_uid != os.getuid() or _owned(path):
                continue
            shutil.rmtree(path)
            removed.append(path)
    return removed


def make_scratch(prefix: str, root: Path | None = None) -> Scratch:
    """A new folder `prefix*` in the temporary directory, owned by this process; stale ones swept first."""
    sweep_stale(prefix, root)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    fd = os.open(path / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return Scratch(path, fd)


@contextlib.contextmanager
def scratch_dir(prefix: str, root: Path | None = None) -> Iterator[Path]:
    """A folder owned by this process for the block, removed when the block exits however it exits."""
    scratch = make_scratch(prefix, root)
    try:
        yield scratch.path
    finally:
        scratch.remove()
