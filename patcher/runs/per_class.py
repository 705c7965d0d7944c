"""per_class_accuracy.json: every task's accuracy per class, on test for each stored model and on the held-out
split at every alpha evaluated, read and written here (typed records, like the manifest). Imports no torch.

Figures are percentages in the order of the task's labels (`TaskRecord.label_names`); a class without an image
in the split is null. `test_images` counts each class's test images, so a reader can weigh a worst class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.base.files import read_json_record, write_json
from patcher.base.records import RecordError, from_json, to_json
from patcher.runs.layout import PER_CLASS

PER_CLASS_FORMAT = "patcher-per-class/1"


@dataclass(frozen=True)
class AlphaPerClass:
    """Held-out accuracy per class at one alpha."""

    alpha: float
    accuracy: list[float | None]


@dataclass(frozen=True)
class TaskPerClass:
    """One task's per-class figures."""

    labels: list[str]
    test_images: list[int]
    test: dict[str, list[float | None]]  # by stored model (zeroshot, finetuned, patched)
    val: list[AlphaPerClass] = field(default_factory=list)


@dataclass(frozen=True)
class PerClassRecord:
    """per_class_accuracy.json."""

    format: str
    tasks: dict[str, TaskPerClass]

    def __post_init__(self) -> None:
        for name, task in self.tasks.items():
            lists = [task.test_images, *task.test.values(), *(point.accuracy for point in task.val)]
            if any(len(values) != len(task.labels) for values in lists):
                raise ValueError(f"tasks.{name}: a list does not have one value per label")


def write_per_class(run_dir: Path, record: PerClassRecord) -> None:
    """Write per_class_accuracy.json into a run (or staging) directory."""
    write_json(run_dir / PER_CLASS, to_json(record))


def read_per_class(run_dir: Path) -> PerClassRecord:
    """A run's per_class_accuracy.json, checked; PatcherError naming what is wrong."""
    path = run_dir / PER_CLASS
    if not path.is_file():
        raise PatcherError(f"{run_dir} has no {PER_CLASS}: it was built before per-class figures; rebuild it")
    data = read_json_record(path, PER_CLASS_FORMAT, "rebuild the run")
    try:
        return from_json(PerClassRecord, data)
    except RecordError as error:
        raise PatcherError(f"{path} is damaged or was edited by hand: {error}: rebuild the run") from None
