"""What an item of a dataset is: the file it comes from (for error messages) and a fingerprint of the whole set.

Task datasets are views (`ImageView`, `Subset`, `ConcatDataset`) over torchvision classes, which keep their
items as file lists (`samples`, `_samples`, `_image_files`, `images`) or in-memory arrays (`data`). The
fingerprint covers the item order, every file's path, size and modification time, or the array bytes;
a dataset of another kind has none, and nothing about it is cached across runs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

FILE_LISTS = ("samples", "_samples", "_image_files", "images")


def _entries(dataset: Any) -> list[Any] | None:
    for attribute in FILE_LISTS:
        entries = getattr(dataset, attribute, None)
        if isinstance(entries, list) and entries:
            first = entries[0][0] if isinstance(entries[0], tuple) else entries[0]
            if isinstance(first, str | os.PathLike):
                return entries
    return None


def _files(dataset: Any) -> list[str] | None:
    entries = _entries(dataset)
    return None if entries is None else [str(e[0] if isinstance(e, tuple) else e) for e in entries]


def _children(dataset: Any) -> tuple[Any, np.ndarray | None] | None:
    """(inner dataset, index map or None) for the view types patcher builds on."""
    from patcher.data.tasks.views import ImageView

    if isinstance(dataset, ImageView):
        return dataset.base, dataset.indices
    if isinstance(dataset, Subset):
        return dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)
    return None


def item_source(dataset: Dataset, index: int) -> str:
    """The file an item comes from, or 'item I of <dataset type>' for in-memory data."""
    while (inner := _children(dataset)) is not None:
        dataset, indices = inner
        index = int(indices[index]) if indices is not None else index
    if isinstance(dataset, ConcatDataset):
        part = int(np.searchsorted(dataset.cumulative_sizes, index, side="right"))
        offset = index - (dataset.cumulative_sizes[part - 1] if part else 0)
        return item_source(dataset.datasets[part], offset)
    files = _files(dataset)
    if files is not None and index < len(files):
        return files[index]
    return f"item {index} of {type(dataset).__name__}"


def _relabel_identity(relabel: Any) -> str:
    if relabel is None:
        return ""
    owner = getattr(relabel, "__self__", None)  # a bound `list.__getitem__` maps labels by a table
    return repr(owner) if isinstance(owner, (list, tuple, dict)) else getattr(relabel, "__qualname__", repr(relabel))


def _update(digest: Any, dataset: Any, selected: np.ndarray | None = None) -> bool:
    """Hash the items of `dataset` at `selected` (all when None): only the files a view uses are looked at."""
    inner = _children(dataset)
    if inner is not None:
        base, indices = inner
        digest.update(_relabel_identity(getattr(dataset, "target", None)).encode())
        if indices is not None:
            selected = indices if selected is None else indices[selected]
        return _update(digest, base, selected)
    if isinstance(dataset, ConcatDataset):
        if selected is not None:
            digest.update(np.ascontiguousarray(selected, dtype=np.int64).tobytes())
        return all(_update(digest, part) for part in dataset.datasets)
    entries = _entries(dataset)
    if entries is not None:
        for index in range(len(entries)) if selected is None else selected.tolist():
            entry = entries[index]
            path, label = (entry[0], entry[1]) if isinstance(entry, tuple) else (entry, "")
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return True
    for attribute in ("data", "images"):
        array = getattr(dataset, attribute, None)
        if isinstance(array, torch.Tensor):
            array = array.numpy()
        if isinstance(array, np.ndarray):
            if selected is not None:
                digest.update(np.ascontiguousarray(selected, dtype=np.int64).tobytes())
            digest.update(f"{array.dtype}|{array.shape}|".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
            return True
    return False


def fingerprint(dataset: Dataset) -> str | None:
    """sha256 over the items a dataset yields (files by path, size and mtime; arrays by bytes); None if unknown."""
    digest = hashlib.sha256(f"{len(dataset)}|".encode())  # type: ignore[arg-type]
    try:
        known = _update(digest, dataset)
    except OSError:
        return None
    return digest.hexdigest() if known else None
