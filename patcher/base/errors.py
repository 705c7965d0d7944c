"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

import errno
import re
from pathlib import Path


class PatcherError(Exception):
    """A problem with the user's input or environment, explained in one line with what to do."""

    exit_code = 2


# What to do about the OSErrors a stage meets while it reads or writes files.
_ADVICE = {
    errno.ENOSPC: "free space on that filesystem or write somewhere else",
    errno.EDQUOT: "free space within your quota or write somewhere else",
    errno.EFBIG: "the file exceeds the filesystem's or the process's file-size limit (ulimit -f): raise it "
                 "or write somewhere else",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.EACCES: "check the permissions or write somewhere else",
    errno.EPERM: "check the permissions or write somewhere else",
    errno.ENAMETOOLONG: "choose a shorter name (at most 255 bytes per path component)",
    errno.ENOENT: "check the path",
    errno.EIO: "the device reported an I/O error: check the disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_message(error: OSError, doing: str = "") -> str:
    """One line for an OSError: what failed, on which file, and what to do."""
    reason = (error.strerror or str(error) or type(error).__name__).rstrip(".")
    reason = reason[0].lower() + reason[1:]
    if error.filename:
        reason = f"{reason}: {error.filename}"
    fallback = "check the path and the filesystem" if error.filename else "check the system and retry"
    advice = _ADVICE.get(error.errno or -1, fallback)
    return f"{doing} ({reason}): {advice}" if doing else f"{reason}: {advice}"


def from_os_error(error: OSError, doing: str = "") -> PatcherError:
    """A PatcherError carrying `os_error_message(error, doing)`."""
    return PatcherError(os_error_message(error, doing))


_RUST_IO = re.compile(r"code: (\d+)")


def as_os_error(error: BaseException, path: Path | str | None = None) -> OSError | None:
    """The OSError inside an error raised by a library writer (safetensors' Rust IoError), else None."""
    if isinstance(error, OSError):
        return error
    match = _RUST_IO.search(str(error))
    if type(error).__name__ == "SafetensorError" and match:
        code = int(match.group(1))
        import os

        return OSError(code, os.strerror(code), None if path is None else str(path))
    return None
