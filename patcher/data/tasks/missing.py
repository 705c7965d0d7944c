"""One-line errors for data that is not where a loader expects it, and a guard that raises them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from patcher.base.errors import PatcherError

T = TypeVar("T")

DOWNLOAD_HINT = "pass --download on a connected machine or --data-dir DIR"
MANUAL_HINT = "it cannot be downloaded automatically: fetch it by hand, then pass --data-dir DIR"


def missing_data_error(
    title: str, where: Path, expected: str, *, downloadable: bool = True, problem: str | None = None
) -> PatcherError:
    """A PatcherError naming the dataset, the folder searched, the files expected there, and what to do."""
    detail = f"; {problem}" if problem else ""
    hint = DOWNLOAD_HINT if downloadable else MANUAL_HINT
    return PatcherError(f"{title} not found under {where}: expected {expected}{detail}; {hint}")


def open_dataset(
    make: Callable[[], T],
    *,
    title: str,
    where: Path,
    expected: str,
    download: bool,
    downloadable: bool = True,
) -> T:
    """Call `make` (a dataset constructor); turn torchvision's not-found and download errors into one line."""
    try:
        return make()
    except Exception as error:  # torchvision and the readers it uses raise many kinds; report any in one line
        if download and downloadable:
            problem = f"download failed: {first_line(error)}"
        elif isinstance(error, FileNotFoundError) or "not found" in str(error).lower():
            problem = None  # the plain case: nothing there yet
        else:
            problem = f"reading it failed: {first_line(error)}"
        raise missing_data_error(title, where, expected, downloadable=downloadable, problem=problem) from error


def first_line(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
