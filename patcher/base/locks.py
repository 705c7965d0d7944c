"""One writer per output: an exclusive `flock` on a hidden sibling file, released by the kernel when the holder dies."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from patcher.base.errors import PatcherError, from_os_error

_HELD: dict[Path, int] = {}  # lock files this process holds, with their nesting depth (the lock is reentrant)
NAME_MAX = 255  # bytes in one path component (Linux, macOS)
SUFFIX_ROOM = 32  # what hidden siblings add to a name: ".", ".partial-0123abcd", ".lock", ...


def check_output_name(target: Path) -> None:
    """PatcherError, before any work, for an output whose name no filesystem takes."""
    name = Path(target).name
    size = len(os.fsencode(name))
    if size > NAME_MAX:
        raise PatcherError(f"output name {name[:32]}... is {size} bytes long, more than the {NAME_MAX} a file name "
                           "may have: choose a shorter name")


def hidden_sibling(target: Path, suffix: str) -> Path:
    """`.NAME<suffix>` beside `target`; a NAME too long to take the suffix is cut and given a hash of the whole."""
    target = Path(target)
    name = target.name
    if len(os.fsencode(name)) > NAME_MAX - SUFFIX_ROOM:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        name = f"{os.fsdecode(os.fsencode(name)[:160]).rstrip(chr(0xFFFD))}~{digest}"
    return target.with_name(f".{name}{suffix}")


def lock_path(target: Path) -> Path:
    """The hidden sibling file whose lock guards `target`."""
    return hidden_sibling(Path(target).absolute(), ".lock")


def _holder() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    program = "patcher" if program in ("__main__.py", "-c") else program  # `python -m patcher`
    command = " ".join([program, *sys.argv[1:2]]).strip()
    return f"pid {os.getpid()} ({command})" if command else f"pid {os.getpid()}"


def _acquire(path: Path, target: Path, wait: bool) -> int:
    """An open descriptor of `path` holding its exclusive lock; PatcherError when another process holds it (or, with
    `wait`, once it has released it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise PatcherError(f"{target} is being written by {holder}: wait for it to finish, "
                               "or choose another output") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder unlinks the file before it unlocks: make sure we locked the live one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def output_lock(target: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `target` while a stage writes it; PatcherError if another process holds it, unless
    `wait` (then block until it is released).

    Reentrant within a process. The lock file is removed on release, and so are the parent folders made for it
    if nothing was written into them; one left by a killed holder is unlocked (the kernel drops `flock` locks
    with the process) and is taken over by the next run.
    """
    path = lock_path(target)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, Path(target), wait)
    except OSError as error:
        _remove_empty(created)
        raise from_os_error(error, f"cannot write {target}") from error
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[path] = 1
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder().encode(), 0)  # who holds it, for the message another process shows
        except OSError:
            pass  # a full disk: the lock holds all the same, and the stage's own writes report the fault
        yield
    finally:
        del _HELD[path]
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            _remove_empty(created)  # folders made for an output that was not written


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
