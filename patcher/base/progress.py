"""Rich progress bars shared by every loop a person waits on."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def make_progress(enabled: bool | None = None) -> Progress:
    """A progress display on stderr with a bar, counts and times; shown by rank 0 only unless `enabled` says."""
    if enabled is None:
        enabled = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank, read without importing torch
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not enabled,
    )

