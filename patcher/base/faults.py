"""Faults while a stage writes its output (a full disk, a file-size limit, permissions) as one-line PatcherErrors."""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from patcher.base.errors import PatcherError, as_os_error, os_error_message

FULL_BYTES = 4 << 20  # a filesystem with less free space than this after a failed write is taken to be full


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            stats = os.statvfs(folder)
        except OSError:
            continue
        return (stats.f_bfree if os.geteuid() == 0 else stats.f_bavail) * stats.f_frsize
    return None


def _largest_file(folder: Path) -> tuple[int, Path | None]:
    largest: tuple[int, Path | None] = (0, None)
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            try:
                size = path.lstat().st_size
            except OSError:
                continue
            largest = max(largest, (size, path), key=lambda item: item[0])
    return largest


def _inferred_os_error(error: BaseException, staging: Path) -> OSError | None:
    """The OSError behind a writer's error that names none (torch.save's RuntimeError): full disk or size limit."""
    if not isinstance(error, RuntimeError) or not staging.exists():
        return None
    free = _free_bytes(staging)
    if free is not None and free < FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        size, path = _largest_file(staging)
        if path is not None and size >= limit - (1 << 16):
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    return None


def write_failure(error: BaseException, target: Path, staging: Path | None = None) -> PatcherError | None:
    """The PatcherError for a fault met while writing `target` (in `staging`), None for anything else."""
    os_error = as_os_error(error, staging or target)
    if os_error is None and staging is not None:
        os_error = _inferred_os_error(error, staging)
    if os_error is None:
        return None
    if os_error.filename is not None and not _beside(Path(os.fsdecode(os_error.filename)), target):
        return PatcherError(f"{os_error_message(os_error)}; nothing was written to {target}")  # a file it reads
    return PatcherError(f"{os_error_message(os_error, f'cannot write {target}')}; nothing was written")


def _beside(path: Path, target: Path) -> bool:
    """True for `target`, what is in it, and its hidden siblings (staging, lock) and what is in them."""
    path, target = path.absolute(), target.absolute()
    for candidate in (path, *path.parents):
        if candidate == target or (candidate.parent == target.parent and candidate.name.startswith(f".{target.name}")):
            return True
    return False


@contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Give an OSError raised in the block the file name it lacks (a failed `write` names none)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


@contextmanager
def write_errors(target: Path, staging: Path | None = None) -> Iterator[None]:
    """Turn OSErrors (and writers' errors that hide one) raised in the block into one-line PatcherErrors."""
    try:
        yield
    except PatcherError:
        raise
    except Exception as error:
        converted = write_failure(error, Path(target), staging)
        if converted is None:
            raise
        raise converted from error
