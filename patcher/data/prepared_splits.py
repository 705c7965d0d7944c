"""Every split a build reads, prepared so that memory does not grow with the number of images.

Held-out and test splits become image stores (decoded once; RAM when small, else a disk cache).
Training splits stay lazy: DataLoader workers decode and augment each step's items (open_clip's train
transform), or, for a small split without augmentation, they are read from a RAM store. `--data-mode`
forces either side of the size rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.data.image_store import ImageStore, StoreItems, build_store, remove_store
from patcher.data.items import TransformedItems
from patcher.data.options import DataOptions
from patcher.data.shots import FewShot
from patcher.data.tasks import Task
from patcher.data.tasks.checks import SkipReport
from patcher.data.transforms import Normalize, eval_transform, train_transform


@dataclass
class TrainSplit:
    """One task's training split as the training loop reads it."""

    items: Dataset  # what batches come from: augmented images, a RAM store's pixels, or embeddings
    workers: int = 0  # DataLoader workers for it (0: this process)
    plain: Dataset | None = None  # the same images with the eval transform (for embeddings); None: `items`
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.plain is None:
            self.plain = self.items

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]


@dataclass
class Splits:
    """Training splits of the patch tasks; held-out and test stores of every task; how to normalise pixels."""

    train: dict[str, TrainSplit]
    val: dict[str, ImageStore]
    test: dict[str, ImageStore]
    normalize: Normalize
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # folder -> (file, reason) left out
    one_off: list[Path] = field(default_factory=list)  # disk stores to delete at the end

    def close(self) -> None:
        """Delete the disk stores that no later run could recognise."""
        for folder in self.one_off:
            remove_store(folder)
        self.one_off.clear()


@dataclass(frozen=True, kw_only=True)
class SplitTasks:
    """Which splits a job reads: the training split of each `train` task (K images per class with `shots`), and the
    held-out and test splits of each `evaluate` task."""

    train: list[Task] = field(default_factory=list)
    evaluate: list[Task] = field(default_factory=list)
    shots: FewShot | None = None


def _dataset(task: Task, split: str, data_dir: Path | None, download: bool, bad_images: SkipReport | None) -> Dataset:
    dataset = task.dataset(split, data_root=data_dir, download=download, bad_images=bad_images)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise PatcherError(f"{task.name} has no images in its {split} split: check the dataset folder")
    return dataset


def prepare_splits(
    tasks: SplitTasks, preprocess_cfg: Mapping[str, Any], options: DataOptions, *, data_dir: Path | None = None,
    download: bool = False, device: str = "cpu",
) -> Splits:
    """Find every split (failing before any work if one is missing), then build the held-out and test stores;
    with `tasks.shots`, training splits keep K images per class (held-out and test splits stay whole)."""
    options.check()
    report = SkipReport() if options.skip_bad_images else None
    found = {(task.name, split): _dataset(task, split, data_dir, download, report)
             for group, splits in ((tasks.train, ("train",)), (tasks.evaluate, ("val", "test")))
             for task in group for split in splits}
    normalize = Normalize(preprocess_cfg)
    result = Splits({}, {}, {}, normalize, skipped=dict(report.skipped) if report else {})
    for task in tasks.train:
        dataset = found[task.name, "train"]
        if tasks.shots is not None:
            dataset = tasks.shots.select(dataset, task.name, len(task.classnames))
        small = options.in_memory(len(dataset), preprocess_cfg)  # type: ignore[arg-type]
        workers = options.workers_for(len(dataset), preprocess_cfg)  # type: ignore[arg-type]
        plain = TransformedItems(dataset, eval_transform(preprocess_cfg))
        if options.augment:
            items: Dataset = TransformedItems(dataset, train_transform(preprocess_cfg))
        elif small:
            store, _ = build_store(dataset, preprocess_cfg, f"decoding {task.name}/train", True, workers)
            items = plain = StoreItems(store, normalize)
        else:
            items = plain
        result.train[task.name] = TrainSplit(items, workers, plain, pin_memory=device.startswith("cuda"))
    for task in tasks.evaluate:
        for split, stores in (("val", result.val), ("test", result.test)):
            dataset = found[task.name, split]
            count = len(dataset)  # type: ignore[arg-type]
            store, one_off = build_store(dataset, preprocess_cfg, f"decoding {task.name}/{split}",
                                         options.in_memory(count, preprocess_cfg),
                                         options.workers_for(count, preprocess_cfg), options.cache_dir)
            stores[task.name] = store
            if one_off is not None:
                result.one_off.append(one_off)
    return result


def load_images(dataset: Dataset, preprocess_cfg: Mapping[str, Any], description: str) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """A small dataset through the eval transform, whole: (images [N, 3, H, W] float32, labels [N])."""
    store, _ = build_store(dataset, preprocess_cfg, description, in_memory=True)
    return Normalize(preprocess_cfg)(torch.from_numpy(store.array)), torch.from_numpy(store.labels)

