"""A user's dataset stored as WebDataset shards, "wds:DIR": DIR/train/*.tar, optionally DIR/val/*.tar and
DIR/test/*.tar (or the shards directly in DIR, split 4:1 into train and test, seeded and stratified).

Each sample is the tar members that share a key (`shapes/000017.png`, `shapes/000017.cls`): one image (jpg, jpeg,
png, webp, bmp, ppm) and a label (`.cls`, else `.label` or `.txt`; `?label_key=EXT` picks another extension), read as
text. Shards are indexed once, member by member, into compact arrays (shard, offset, size, label); an image is read
by seeking to its bytes when its item is read, so memory holds no image data and shards are never unpacked.
Compressed shards (.tar.gz) cannot be seeked: they are refused.
"""

from __future__ import annotations

import io
import tarfile
from array import array
from functools import partial
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.base.progress import make_progress
from patcher.data.tasks.splits import train_test_indices
from patcher.data.tasks.task import Task
from patcher.data.tasks.user_data import Spec, class_names, read_templates
from patcher.data.tasks.views import ImageView

PREFIX = "wds:"
OPTIONS = ("label_key",)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
LABEL_EXTENSIONS = ("cls", "label", "txt")
LAYOUT = "DIR/train/*.tar (optionally val/*.tar, test/*.tar) or DIR/*.tar, each sample an image and a .cls label"


class ShardIndex:
    """Where each sample's image is: shard number, byte offset and size, label number; arrays, not objects."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards
        self.shard, self.offset, self.size = array("i"), array("q"), array("q")
        self.labels: list[str] = []  # raw labels, replaced by numbers (self.number) once the classes are known
        self.number = array("i")

    def add(self, shard: int, offset: int, size: int, label: str) -> None:
        """One sample."""
        self.shard.append(shard)
        self.offset.append(offset)
        self.size.append(size)
        self.labels.append(label)

    def numbered(self, labels: tuple[str, ...]) -> ShardIndex:
        """Raw labels replaced by their numbers among `labels` (the raw strings are dropped)."""
        number = {label: index for index, label in enumerate(labels)}
        self.number = array("i", (number[label] for label in self.labels))
        self.labels = []
        return self


class ShardImages(Dataset):
    """Indexed shard samples as (RGB PIL image, int label) items."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self.targets = index.number.tolist()

    def __len__(self) -> int:
        return len(self.index.offset)

    def __getitem__(self, item: int) -> tuple[Image.Image, int]:
        index = self.index
        with open(index.shards[index.shard[item]], "rb") as handle:
            handle.seek(index.offset[item])
            data = handle.read(index.size[item])
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB"), index.number[item]


def shard_task(spec: Spec, name: str) -> Task:
    """The task of a shard dataset: class names from the labels (or classnames.txt), val/ used when present."""
    label_key = spec.options.get("label_key")
    parts = shard_parts(spec.location)
    indexes = {part: index_shards(shards, label_key) for part, shards in parts.items()}
    labels, names = class_names(indexes["train"].labels, spec.location, "label")
    extra = sorted(set().union(*(set(index.labels) for index in indexes.values())) - set(labels))
    if extra:
        raise PatcherError(f"shards of {spec.location} have labels that train's lack: {', '.join(extra[:6])}: every "
                           "class needs training images")
    images = {part: ShardImages(index.numbered(labels)) for part, index in indexes.items()}
    return Task(name, names, read_templates(spec.location), partial(load_shards, images), parts=tuple(parts),
                source=spec.source)


def shard_parts(location: Path) -> dict[str, list[str]]:
    """{part: shard files}: DIR/train/*.tar and those of val/, test/ present, or DIR/*.tar as train."""
    if not location.is_dir():
        raise PatcherError(f"shard dataset {location} is not a folder: expected {LAYOUT}")
    folders = {"train": location / "train"} if (location / "train").is_dir() else {"train": location}
    folders.update({part: location / part for part in ("val", "test") if (location / part).is_dir()})
    parts = {}
    for part, folder in folders.items():
        shards = sorted(str(path) for path in folder.iterdir() if path.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not shards:
            raise PatcherError(f"shard dataset {location} has no .tar shards in {folder}: expected {LAYOUT}")
        parts[part] = shards
    return parts


def index_shards(shards: list[str], label_key: str | None) -> ShardIndex:
    """Every sample of the shards, read member by member (a shard's member list is never kept)."""
    index = ShardIndex(shards)
    compressed = [shard for shard in shards if shard.endswith((".gz", ".tgz"))]
    if compressed:
        raise PatcherError(f"{compressed[0]} is compressed: images are read by seeking into shards, so write them "
                           "as plain .tar (webdataset's ShardWriter does by default)")
    with make_progress() as progress:
        bar = progress.add_task(f"indexing {Path(shards[0]).parent.name}/ shards", total=len(shards), status="")
        for number, shard in enumerate(shards):
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    _index_shard(tar, number, label_key, index)
            except (OSError, tarfile.TarError) as error:
                raise PatcherError(f"cannot read shard {shard} ({error}): expected a plain tar file") from error
            progress.update(bar, advance=1, status=f"{len(index.labels)} samples")
    if not index.labels:
        raise PatcherError(f"shards {shards[0]} ... hold no samples with an image and a label: expected {LAYOUT}")
    return index


def _index_shard(tar: tarfile.TarFile, number: int, label_key: str | None, index: ShardIndex) -> None:
    key, image, label = None, None, None
    wanted = (label_key,) if label_key else LABEL_EXTENSIONS
    while (member := tar.next()) is not None:
        tar.members = []  # tarfile keeps every member it has read: drop them, the index is all that is needed
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, extension = base.partition(".")
        stem = f"{folder}/{stem}"
        if stem != key:
            _finish(tar.name, key, image, label, number, index)
            key, image, label = stem, None, None
        extension = extension.lower()
        if extension in IMAGE_EXTENSIONS:
            image = (member.offset_data, member.size)
        elif extension in wanted and (label is None or wanted.index(extension) < wanted.index(label[0])):
            handle = tar.extractfile(member)
            label = (extension, handle.read(4096).decode("utf-8", "replace").strip() if handle else "")
    _finish(tar.name, key, image, label, number, index)


def _finish(shard: str | None, key: str | None, image: tuple[int, int] | None, label: tuple[str, str] | None,
            number: int, index: ShardIndex) -> None:
    if key is None:
        return
    if image is None or label is None or not label[1]:
        lacks = "an image" if image is None else "a label"
        raise PatcherError(f"sample {key} in {shard} lacks {lacks}: each sample needs an image "
                           f"({', '.join(IMAGE_EXTENSIONS)}) and a label ({', '.join(LABEL_EXTENSIONS)})")
    index.add(number, image[0], image[1], label[1])


def load_shards(images: dict[str, ShardImages], part: str, root: Path, download: bool) -> Dataset:
    """One part: its own shards, or (without test/) a seeded stratified 4:1 split of train's."""
    if part in images and (part != "train" or "test" in images):
        return ImageView(images[part])
    train = images["train"]
    return ImageView(train, train_test_indices(train.targets, weights=(4, 1))[part])
