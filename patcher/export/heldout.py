"""Real held-out images of a run's tasks, preprocessed the way clients must, for the parity check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from patcher.base.errors import PatcherError
from patcher.data.prepared_splits import load_images
from patcher.data.tasks import task_of
from patcher.data.tasks.checks import SkipReport

SPLIT = "val"


@dataclass
class HeldOut:
    """Preprocessed images of several tasks in one tensor; `spans[task]` are that task's rows."""

    images: torch.Tensor
    labels: torch.Tensor
    spans: dict[str, slice]

    def counts(self) -> dict[str, int]:
        """Images per task."""
        return {task: span.stop - span.start for task, span in self.spans.items()}


def evenly_spaced(total: int, count: int) -> list[int]:
    """Up to `count` indices spread over range(total), so every part of a split is represented."""
    if total <= count:
        return list(range(total))
    return np.linspace(0, total - 1, num=count).round().astype(int).tolist()


def load_heldout(
    tasks: list[str], preprocess_cfg: dict[str, Any], per_task: int, data_dir: Path | None = None,
    sources: dict[str, str | None] | None = None,
) -> HeldOut:
    """Up to `per_task` images of each task's held-out (val) split, through open_clip's evaluation transform;
    `sources`: where a user's dataset is, by task name (the manifest's)."""
    images, labels, spans, start = [], [], {}, 0
    for name in tasks:
        # parity needs good images, not every image: unusable files are left out
        dataset = task_of(name, (sources or {}).get(name)).dataset(SPLIT, data_root=data_dir, bad_images=SkipReport())
        if len(dataset) == 0:
            raise PatcherError(f"{name} has no images in its {SPLIT} split: the parity check needs some")
        subset = Subset(dataset, evenly_spaced(len(dataset), per_task))
        task_images, task_labels = load_images(subset, preprocess_cfg, f"parity images {name}")
        images.append(task_images)
        labels.append(task_labels)
        spans[name] = slice(start, start + len(task_labels))
        start += len(task_labels)
    return HeldOut(torch.cat(images), torch.cat(labels), spans)
