"""Where datasets live: an explicit directory, else $PATCHER_DATA, else ~/.cache/patcher/data."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "PATCHER_DATA"


def default_data_root() -> Path:
    """The data root used when none is given: $PATCHER_DATA if set, else ~/.cache/patcher/data."""
    configured = os.environ.get(DATA_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "patcher" / "data"


def resolve_data_root(data_root: str | os.PathLike[str] | None) -> Path:
    """The explicit data root if one is given, else the default one."""
    return Path(data_root).expanduser() if data_root is not None else default_data_root()
