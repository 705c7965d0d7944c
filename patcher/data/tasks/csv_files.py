"""A user's dataset listed in CSV files: "csv:DIR" (DIR/train.csv, optionally val.csv and test.csv) or "csv:FILE.csv"
(one file, split 4:1 into train and test, seeded and stratified).

Columns as open_clip_train names them: the image path (`--csv-img-key`, default `filepath`) and the label
(`--csv-caption-key`, here the class label, default `label`); `--csv-separator` (default `,`). Relative paths are
read from the CSV's folder. Rows are read once, as (path, label) pairs; images are opened only when an item is read.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.data.tasks.checks import SkipReport
from patcher.data.tasks.folder import drop_bad_images
from patcher.data.tasks.splits import train_test_indices
from patcher.data.tasks.task import Task
from patcher.data.tasks.user_data import CSV_DEFAULTS, Spec, class_names, read_templates
from patcher.data.tasks.views import ImageView

PREFIX = "csv:"
OPTIONS = ("img_key", "label_key", "sep")
LAYOUT = "DIR/train.csv (optionally val.csv, test.csv) or one FILE.csv, with an image path and a label column"


class CsvImages(Dataset):
    """Rows of a CSV file as (RGB PIL image, int label) items; `samples` holds (path, label) like ImageFolder."""

    def __init__(self, samples: list[tuple[str, int]], classes: tuple[str, ...]) -> None:
        self.samples = samples
        self.classes = classes
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def csv_task(spec: Spec, name: str) -> Task:
    """The task of a CSV dataset: class names from the label column (or classnames.txt), val.csv used if present."""
    options = {**CSV_DEFAULTS, **spec.options}
    files = csv_parts(spec.location)
    rows = {part: read_rows(path, options) for part, path in files.items()}
    folder = spec.location if spec.location.is_dir() else spec.location.parent
    labels, names = class_names(rows["train"][1], folder, "label")
    parts = tuple(files)
    extra = sorted(set().union(*(set(part_labels) for _, part_labels in rows.values())) - set(labels))
    if extra:
        raise PatcherError(f"{', '.join(files[p].name for p in parts if p != 'train')} have labels that train lacks: "
                           f"{', '.join(extra[:6])}: every class needs training images")
    return Task(name, names, read_templates(folder), CsvRows(rows, labels, parts).load, parts=parts,
                source=spec.source, checks_files=True)


def csv_parts(location: Path) -> dict[str, Path]:
    """{part: CSV file}: DIR/train.csv and those of val.csv, test.csv present, or the one file given."""
    if location.is_file():
        return {"train": location}
    if not (location / "train.csv").is_file():
        raise PatcherError(f"CSV dataset {location} has no train.csv: expected {LAYOUT}")
    return {part: location / f"{part}.csv" for part in ("train", "val", "test")
            if (location / f"{part}.csv").is_file()}


def read_rows(path: Path, options: dict[str, str]) -> tuple[list[str], list[str]]:
    """(image paths made absolute, labels) of a CSV file; a missing column or an empty cell is refused."""
    image_key, label_key = options["img_key"], options["label_key"]
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=options["sep"])
            missing = [key for key in (image_key, label_key) if key not in (reader.fieldnames or [])]
            if missing:
                raise PatcherError(f"{path} has no column {' or '.join(missing)} (its columns: "
                                   f"{', '.join(reader.fieldnames or []) or 'none'}): name them with --csv-img-key "
                                   "and --csv-caption-key")
            images, labels = [], []
            for line, row in enumerate(reader, 2):
                image, label = (row.get(image_key) or "").strip(), (row.get(label_key) or "").strip()
                if not image or not label:
                    raise PatcherError(f"{path} line {line} has no {image_key if not image else label_key}: "
                                       "every row needs an image path and a label")
                images.append(str(path.parent / image))
                labels.append(label)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PatcherError(f"cannot read CSV dataset file {path} ({error}): expected {LAYOUT}") from error
    if not images:
        raise PatcherError(f"{path} lists no images: expected {LAYOUT}")
    return images, labels


@dataclass(frozen=True, eq=False)  # held by a Task's loader, never compared
class CsvRows:
    """A CSV dataset as read: each part's (image paths, labels), the labels in class order, the parts it has."""

    rows: dict[str, tuple[list[str], list[str]]]
    labels: tuple[str, ...]
    parts: tuple[str, ...]

    def load(self, part: str, root: Path, download: bool, bad_images: SkipReport | None = None) -> Dataset:
        """One part: its own CSV file, or (without test.csv) a seeded stratified 4:1 split of train's rows, its image
        files checked (`root` and `download` are the Loader's, unused: the rows name the files)."""
        own = part in self.parts and (part != "train" or "test" in self.parts)
        images, names = self.rows[part if own else "train"]
        number = {label: index for index, label in enumerate(self.labels)}
        data = CsvImages([(image, number[name]) for image, name in zip(images, names, strict=True)], self.labels)
        drop_bad_images(data, Path(images[0]).parent, bad_images)
        if own:
            return ImageView(data)
        keys = [sample[0] for sample in data.samples]
        return ImageView(data, train_test_indices(data.targets, weights=(4, 1), keys=keys)[part])
