"""Batches as DataLoader workers make them: images through a transform, pixels from a store, or features.

Each reader has `__getitems__`, so a DataLoader fetches a whole batch in one call (in a worker, or in
this process with no workers). Training keys are (index, seed) pairs: the seed drives the augmentation
of that one item, so a batch is a function of the step alone, whichever process or worker makes it.
A reader never raises for a bad item: it returns an `ItemError` naming the file, which the process
that consumes the batch turns into one clear error (an exception inside a worker would arrive wrapped
in another process's traceback).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from patcher.data.identity import item_source
from patcher.data.transforms import Normalize, Transform, to_pixels

Key = int | tuple[int, int]  # an index, or (index, augmentation seed)


@dataclass
class Batch:
    """Inputs and labels of one batch; `normalize` is set when the inputs are uint8 pixels still to normalise."""

    inputs: torch.Tensor
    labels: torch.Tensor
    normalize: Normalize | None = None

    def images(self, device: str | torch.device) -> torch.Tensor:
        """The model's float inputs on `device` (pixels are copied as uint8 and normalised there)."""
        inputs = self.inputs.to(device, non_blocking=True)
        return self.normalize(inputs) if self.normalize is not None else inputs

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory (what the DataLoader's pin_memory calls)."""
        return Batch(self.inputs.pin_memory(), self.labels.pin_memory(), self.normalize)


@dataclass
class ItemError:
    """A batch that could not be made: which file and why."""

    source: str
    reason: str

    def message(self, what: str) -> str:
        """One line for the user: the file, the reason, what to do."""
        return f"cannot read {self.source} ({self.reason}) while loading {what}: fix or remove that file"


def unbatched(batch: Any) -> Any:
    """The DataLoader collate function for readers that return whole batches."""
    return batch


def _index(key: Key) -> int:
    return key[0] if isinstance(key, tuple) else key


class TransformedItems(Dataset):
    """(PIL image, label) items of `dataset` through `transform`; with (index, seed) keys, seeded per item."""

    def __init__(self, dataset: Dataset, transform: Transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: Sequence[Key]) -> Batch | ItemError:
        images, labels = [], []
        for key in keys:
            index = _index(key)
            try:
                image, label = self.dataset[index]
                if isinstance(key, tuple):
                    with torch.random.fork_rng(devices=[]):
                        torch.default_generator.manual_seed(key[1])  # the transforms draw from it alone
                        images.append(self.transform(image))
                else:
                    images.append(self.transform(image))
            except Exception as error:  # PIL and the file system raise many kinds; the batch reports the file
                return ItemError(item_source(self.dataset, index), f"{type(error).__name__}: {error}")
            labels.append(int(label))
        return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long))

    def __getitem__(self, index: int) -> Batch | ItemError:
        return self.__getitems__([index])


class PixelItems(Dataset):
    """(PIL image, label) items of `dataset` as model-sized uint8 pixels [N, H, W, 3] (what a store keeps)."""

    def __init__(self, dataset: Dataset, geometric: Transform) -> None:
        self.dataset = dataset
        self.geometric = geometric

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: Sequence[Key]) -> Batch | ItemError:
        pixels, labels = [], []
        for key in keys:
            index = _index(key)
            try:
                image, label = self.dataset[index]
                pixels.append(to_pixels(self.geometric(image)))
            except Exception as error:  # as above: one message naming the file
                return ItemError(item_source(self.dataset, index), f"{type(error).__name__}: {error}")
            labels.append(int(label))
        return Batch(torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.long))

    def __getitem__(self, index: int) -> Batch | ItemError:
        return self.__getitems__([index])


class TensorItems(Dataset):
    """Rows of in-memory tensors (e.g. embeddings for a linear probe) with their labels."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: Sequence[Key]) -> Batch:
        index = torch.tensor([_index(key) for key in keys], dtype=torch.long)
        return Batch(self.inputs[index], self.labels[index])

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])
