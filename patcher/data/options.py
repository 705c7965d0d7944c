"""How a build reads its data (`DataOptions`): workers, augmentation, and where decoded pixels are kept.
Imports no torch: the manifest records these options."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError

MODES = ("auto", "memory", "stream")
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """DataLoader workers per process: the cores this process may use, less one for training, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def _pixels(preprocess_cfg: Mapping[str, Any]) -> int:
    size = preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    return int(height) * int(width)


@dataclass(frozen=True)
class DataOptions:
    """How splits are read: workers, augmentation, and where decoded pixels are kept."""

    workers: int | None = None  # None: default_workers()
    augment: bool = True  # open_clip's train transform for training (the eval transform otherwise)
    mode: str = "auto"  # auto: RAM for a split up to memory_limit_mb of pixels, disk beyond; memory; stream
    memory_limit_mb: int = 64
    cache_dir: Path | None = None  # disk stores (default $PATCHER_CACHE/images)
    skip_bad_images: bool = False  # folder: datasets leave unusable files out (counted) instead of refusing them

    def check(self) -> None:
        """PatcherError for values that cannot work."""
        if self.mode not in MODES:
            raise PatcherError(f"unknown --data-mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.workers is not None and self.workers < 0:
            raise PatcherError(f"--workers {self.workers} is negative: pass 0 (read in this process) or more")

    def small(self, images: int, preprocess_cfg: Mapping[str, Any]) -> bool:
        """Whether a split's decoded pixels fit in `memory_limit_mb` (then it is read in this process, no workers)."""
        return images * _pixels(preprocess_cfg) * 3 <= self.memory_limit_mb * 2**20

    def in_memory(self, images: int, preprocess_cfg: Mapping[str, Any]) -> bool:
        """Whether a split of this many images keeps its pixels in RAM."""
        return self.mode == "memory" if self.mode != "auto" else self.small(images, preprocess_cfg)

    def workers_for(self, images: int, preprocess_cfg: Mapping[str, Any]) -> int:
        """DataLoader workers for a split: as given, else none for a small split (starting them costs more than
        they save) and `default_workers()` for a large one."""
        if self.workers is not None:
            return self.workers
        return 0 if self.small(images, preprocess_cfg) else default_workers()

    def deciding(self) -> dict[str, Any]:
        """The options that change results (augmentation, files left out); workers and storage do not."""
        return {"augment": self.augment, "skip_bad_images": self.skip_bad_images}
