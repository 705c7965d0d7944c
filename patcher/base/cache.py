"""patcher's cache folder: $PATCHER_CACHE, else ~/.cache/patcher; one subfolder per kind of thing kept there."""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("bin", "heads", "images", "models", "serve")  # datasets have their own root (PATCHER_DATA)


def cache_root() -> Path:
    """$PATCHER_CACHE, else ~/.cache/patcher."""
    return Path(os.environ.get("PATCHER_CACHE") or Path.home() / ".cache" / "patcher")


def cache_dir(kind: str) -> Path:
    """The cache subfolder for one kind of thing (built programs, zero-shot heads, image stores, models, keys)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}: one of {', '.join(KINDS)}")
    return cache_root() / kind
