"""Image stores: a split decoded once into model-sized uint8 pixels, kept in RAM when small, else on disk.

Evaluating one alpha means one pass over every held-out image, and the search makes several passes:
decoding and resizing JPEGs each time would dominate. A store holds the output of the first half of the
eval transform (`transforms.geometric_transform`) as [N, H, W, 3] uint8, a quarter of the float32 size.
On disk it is one flat file read with `pread` (page cache, not this process's memory, holds what was
read), cached under $PATCHER_CACHE/images by the dataset's fingerprint and the transform, so later
builds of the same data reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from patcher.base import distributed
from patcher.base.cache import cache_dir as cache_dir_for
from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.base.locks import output_lock
from patcher.base.progress import console, make_progress
from patcher.base.staging import clean_stale, staged_output
from patcher.data.identity import fingerprint
from patcher.data.items import Batch, ItemError, Key, PixelItems, unbatched
from patcher.data.transforms import Normalize, geometric_transform, image_size

STORE_FORMAT = "patcher-image-store/2"  # 2: store.json records each file's sha256
PIXELS, LABELS, RECORD = "pixels.u8", "labels.npy", "store.json"
BUILD_BATCH = 64


@dataclass
class ImageStore:
    """N model-sized uint8 RGB images and their labels, in RAM (`array`) or in a flat file (`path`)."""

    labels: np.ndarray
    height: int
    width: int
    array: np.ndarray | None = None
    path: Path | None = None
    _handle: tuple[int, int] | None = field(default=None, repr=False)  # (pid, fd): a forked worker reopens

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def item_bytes(self) -> int:
        """Bytes of one image."""
        return self.height * self.width * 3

    @property
    def in_memory(self) -> bool:
        """True when the pixels are held in RAM."""
        return self.array is not None

    def _fd(self) -> int:
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), os.open(self.path, os.O_RDONLY))  # type: ignore[arg-type]
        return self._handle[1]

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Pixels [len(indices), H, W, 3] of the given items, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.array is not None:
            return self.array[indices]
        out = np.empty((len(indices), self.height, self.width, 3), dtype=np.uint8)
        flat = out.reshape(len(indices), -1)
        start = 0
        while start < len(indices):  # one pread per run of consecutive items
            stop = start + 1
            while stop < len(indices) and indices[stop] == indices[stop - 1] + 1:
                stop += 1
            os.preadv(self._fd(), [memoryview(flat[start:stop])], int(indices[start]) * self.item_bytes)
            start = stop
        return out


class StoreItems(Dataset):
    """A store's items as batches of pixels that the consumer normalises (on its device)."""

    def __init__(self, store: ImageStore, normalize: Normalize) -> None:
        self.store = store
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, keys: Sequence[Key]) -> Batch:
        index = np.array([key[0] if isinstance(key, tuple) else key for key in keys], dtype=np.int64)
        return Batch(torch.from_numpy(self.store.read(index)), torch.from_numpy(self.store.labels[index]),
                     self.normalize)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])


def store_key(dataset: Dataset, preprocess_cfg: Mapping[str, Any]) -> str | None:
    """The cache key of a dataset's store for this model's eval transform; None if the dataset has no fingerprint."""
    identity = fingerprint(dataset)
    if identity is None:
        return None
    spec = {k: preprocess_cfg.get(k) for k in ("size", "interpolation", "resize_mode", "fill_color")}
    text = json.dumps({"format": STORE_FORMAT, "data": identity, "transform": spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def open_store(folder: Path, verify: bool = True) -> ImageStore | None:
    """The complete disk store in `folder`, or None if there is none (a build that died leaves no record) or, with
    `verify`, if a file no longer has the sha256 recorded when it was written (bit rot, a stray write)."""
    try:
        record = json.loads((folder / RECORD).read_text())
        labels = np.load(folder / LABELS, allow_pickle=False)
        if record.get("format") != STORE_FORMAT or len(labels) != record["count"]:
            return None
        store = ImageStore(labels, int(record["height"]), int(record["width"]), path=folder / PIXELS)
        if (folder / PIXELS).stat().st_size != len(labels) * store.item_bytes:
            return None
        if verify and any(sha256_file(folder / name) != digest for name, digest in record["sha256"].items()):
            console.print(f"[yellow]warning:[/] the cached image store {folder} fails its checksum (damaged on "
                          "disk): decoding the images again")
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return store


def _batches(dataset: Dataset, preprocess_cfg: Mapping[str, Any], workers: int, description: str):
    loader = DataLoader(PixelItems(dataset, geometric_transform(preprocess_cfg)), batch_size=BUILD_BATCH,
                        num_workers=workers, collate_fn=unbatched, timeout=600 if workers else 0)
    with make_progress() as progress:
        bar = progress.add_task(description, total=len(dataset), status="")  # type: ignore[arg-type]
        try:
            for batch in loader:
                if isinstance(batch, ItemError):
                    raise PatcherError(batch.message(description.removeprefix("decoding ")))
                yield batch
                progress.advance(bar, len(batch.labels))
        except RuntimeError as error:
            if "DataLoader" not in str(error):
                raise
            raise PatcherError(f"a data loader worker failed while {description} ({str(error).splitlines()[0]}): "
                               "rerun with --workers 0 to read in this process and see the file") from None


def _fill_memory(dataset: Dataset, preprocess_cfg: Mapping[str, Any], workers: int, description: str) -> ImageStore:
    height, width = image_size(preprocess_cfg)
    array = np.empty((len(dataset), height, width, 3), dtype=np.uint8)  # type: ignore[arg-type]
    labels = np.empty(len(dataset), dtype=np.int64)  # type: ignore[arg-type]
    start = 0
    for batch in _batches(dataset, preprocess_cfg, workers, description):
        count = len(batch.labels)
        array[start : start + count] = batch.inputs.numpy()
        labels[start : start + count] = batch.labels.numpy()
        start += count
    return ImageStore(labels, height, width, array=array)


def _fill_disk(dataset: Dataset, preprocess_cfg: Mapping[str, Any], workers: int, description: str,
               folder: Path) -> ImageStore:
    height, width = image_size(preprocess_cfg)
    labels = []
    with staged_output(folder, overwrite=True) as output:
        staging = output.open()
        with open(staging / PIXELS, "wb") as pixels:
            for batch in _batches(dataset, preprocess_cfg, workers, description):
                pixels.write(batch.inputs.numpy().tobytes())
                labels.append(batch.labels.numpy())
        np.save(staging / LABELS, np.concatenate(labels) if labels else np.empty(0, dtype=np.int64))
        record = {"format": STORE_FORMAT, "count": int(sum(len(part) for part in labels)), "height": height,
                  "width": width, "sha256": {name: sha256_file(staging / name) for name in (PIXELS, LABELS)}}
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    store = open_store(folder, verify=False)  # its hashes were just taken from what was written
    if store is None:
        raise PatcherError(f"the image store written to {folder} does not read back: remove it and rerun")
    return store


def build_store(dataset: Dataset, preprocess_cfg: Mapping[str, Any], description: str, in_memory: bool,
                workers: int = 0, cache_dir: Path | None = None) -> tuple[ImageStore, Path | None]:
    """The dataset's store: filled in RAM, or opened from / written to the disk cache.

    Returns the store and, for a disk store of a dataset without a fingerprint, the folder to delete when
    done (it cannot be recognised again). Under torchrun rank 0 writes a disk store and the others open it.
    """
    if in_memory:
        return _fill_memory(dataset, preprocess_cfg, workers, description), None
    cache_dir = cache_dir or cache_dir_for("images")
    key = store_key(dataset, preprocess_cfg)
    temporary = key is None
    if temporary:  # every rank must agree on the name of a one-off folder
        key = distributed.broadcast(f"once-{uuid.uuid4().hex}")
    folder = cache_dir / str(key)
    store = None
    if distributed.is_main():
        with output_lock(folder, wait=True):  # another build filling the same store: wait, then use its work
            clean_stale(folder)  # what a build killed while filling it left
            store = open_store(folder) or _fill_disk(dataset, preprocess_cfg, workers, description, folder)
    distributed.barrier()
    store = store or open_store(folder, verify=False)  # rank 0 has checked it
    if store is None:
        raise PatcherError(f"rank {distributed.rank()} cannot open the image store {folder}: torchrun ranks on "
                           "several nodes need a shared PATCHER_CACHE (or --data-mode memory)")
    return store, folder if temporary else None


def remove_store(folder: Path | None) -> None:
    """Delete a one-off disk store (rank 0 only, after every rank is done with it)."""
    distributed.barrier()
    if folder is not None and distributed.is_main():
        shutil.rmtree(folder, ignore_errors=True)
