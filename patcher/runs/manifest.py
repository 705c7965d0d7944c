"""The run manifest: the record every later stage trusts, as typed records with one reader and one writer.

`load_run(path)` reads manifest.json and checks every field's type and meaning (a hand-edited or damaged
manifest is one error line); `Run.verified_file` checks a file's hash against it before anything reads the
file. The build and merge stages make a `Manifest` and `write_manifest` writes it, last, so that a staging
directory holding one is complete. Field order is the JSON order (docs/contracts.md describes each field).
Imports no torch: serving-side commands read runs too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.files import FileRecord, read_json_record, sha256_file, write_json
from patcher.base.records import OMIT_NONE, RecordError, from_json, to_json
from patcher.base.staging import FINGERPRINT
from patcher.runs.layout import CHECKPOINTS, MANIFEST, REPORTS, TIMINGS
from patcher.runs.merge_record import MergeRecord

RUN_FORMAT = "patcher-run/1"
TIMINGS_FORMAT = "patcher-timings/1"
ROLES = ("patch", "support", "monitor")
MAX_IMAGE_SIDE = 8192


@dataclass(frozen=True)
class Preprocess:
    """What a client must do to an image before the encoder sees it (open_clip's eval transform)."""

    image_size: tuple[int, int]  # (height, width) in pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    crop: str = "center"

    def __post_init__(self) -> None:
        size = self.image_size
        if len(size) != 2 or not all(0 < side <= MAX_IMAGE_SIDE for side in size):
            raise ValueError(f"image_size {list(size)} is not [height, width] in pixels")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError("mean and std must have 3 values, std positive")

    @classmethod
    def from_open_clip(cls, preprocess_cfg: Mapping[str, Any]) -> Preprocess:
        """From open_clip's preprocessing config (its defaults where it says nothing)."""
        size = preprocess_cfg.get("size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            image_size=(int(height), int(width)),
            mean=tuple(float(m) for m in preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(s) for s in preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            resize_mode=preprocess_cfg.get("resize_mode", "shortest"),
        )


@dataclass(frozen=True)
class BaseModel:
    """The model a run starts from."""

    name: str
    pretrained: str | None
    image_size: int | None  # the --image-size override, if any
    weights_sha256: str
    embed_dim: int
    preprocess: Preprocess

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim {self.embed_dim} is not a positive integer")


@dataclass(frozen=True)
class TaskRecord:
    """One task of the run: its role (patch, support, or monitor: measured, never judged), the class names of its
    head's columns, prompt templates and split sizes; `labels` and `column_labels` where several columns score one
    label (ObjectNet)."""

    role: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...] = ("{}",)
    sizes: dict[str, int] = field(default_factory=dict)
    labels: tuple[str, ...] | None = field(default=None, metadata=OMIT_NONE)
    column_labels: tuple[int, ...] | None = field(default=None, metadata=OMIT_NONE)
    source: str | None = field(default=None, metadata=OMIT_NONE)  # a user's dataset: "folder:/abs/path", ...

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        if not self.classnames or not all(self.classnames):
            raise ValueError("no class names")
        if not self.templates or not all(self.templates):
            raise ValueError("malformed templates")
        if (self.labels is None) != (self.column_labels is None):
            raise ValueError("labels and column_labels go together")
        if self.column_labels is not None and len(self.column_labels) != len(self.classnames):
            raise ValueError("column_labels must give one label per class name")

    @property
    def label_names(self) -> tuple[str, ...]:
        """The classes the task's labels count (per-class figures are in this order)."""
        return self.labels if self.labels is not None else self.classnames


@dataclass(frozen=True)
class MethodRecord:
    """The fine-tuning method: its name and parameters, what it trains, which heads it trains."""

    name: str
    params: dict[str, Any]
    trains: list[str]
    head_tasks: list[str]
    reference: str


@dataclass(frozen=True)
class CurvePoint:
    """Held-out top-1 accuracy, macro-F1 and worst-class accuracy of every task at one alpha (%)."""

    alpha: float
    val_accuracy: dict[str, float]
    val_macro_f1: dict[str, float] = field(default_factory=dict)
    val_worst_class_accuracy: dict[str, float] = field(default_factory=dict)


def curve_points(curve: Mapping[float, Mapping[str, float]],
                 metrics: Mapping[float, Mapping[str, Mapping[str, float]]] | None = None) -> list[CurvePoint]:
    """A search's {alpha: accuracies} as points in ascending alpha, with {alpha: {task: {metric: value}}} when
    given (data.metrics.Scores.metrics())."""
    metrics = metrics or {}

    def of(alpha: float, name: str) -> dict[str, float]:
        return {task: values[name] for task, values in metrics.get(alpha, {}).items()}

    return [CurvePoint(alpha, dict(values), of(alpha, "macro_f1"), of(alpha, "worst_class_accuracy"))
            for alpha, values in sorted(curve.items())]


@dataclass(frozen=True)
class SelectionStep:
    """One step of a sequential run: the task patched and the alpha chosen for it."""

    task: str
    alpha: float
    rule: str
    warning: str | None
    evaluations: int
    curve: list[CurvePoint]


@dataclass(frozen=True)
class FineTuneStep:
    """One fine-tune of a parallel run: the task and its training steps."""

    task: str
    steps: int


@dataclass(frozen=True)
class MergedRun:
    """A run that `patcher merge` combined."""

    name: str
    path: str
    manifest_sha256: str
    method: MethodRecord | None
    patch_tasks: list[str]
    alpha: float


@dataclass(frozen=True)
class MultiRecord:
    """How several patch tasks were combined."""

    strategy: str
    steps: list[SelectionStep | FineTuneStep] | None = field(default=None, metadata=OMIT_NONE)
    merged_runs: list[MergedRun] | None = field(default=None, metadata=OMIT_NONE)
    merge: MergeRecord | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True)
class TextTower:
    """Whether the method trained the text tower, and the files holding it."""

    trained: bool
    files: dict[str, str]


@dataclass(frozen=True)
class DataRecord:
    """How the data was read (`DataOptions`' fields, copied: the format changes only here), and the files left
    out."""

    workers: int | None = None
    augment: bool = True
    mode: str = "auto"
    memory_limit_mb: int = 64
    cache_dir: Path | None = None
    skip_bad_images: bool = False
    skipped_bad_images: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldoutEvaluation:
    """Held-out accuracy of the weights being trained at one step (`--eval-every`)."""

    step: int  # numbered across stages and fine-tunes, as in train.log
    stage: str
    val_accuracy: dict[str, float]


def heldout_evaluations(train_log: Path) -> list[HeldoutEvaluation]:
    """The evaluations a train.log records (its lines with `val_accuracy`), in step order."""
    if not train_log.is_file():
        return []
    lines = [json.loads(line) for line in train_log.read_text().splitlines() if '"val_accuracy"' in line]
    return [HeldoutEvaluation(int(line["step"]), str(line["stage"]), dict(line["val_accuracy"])) for line in lines]


@dataclass(frozen=True)
class TrainingRecord:
    """The main stage's hyperparameters (`TrainConfig`'s fields, copied: the format changes only here), then how and
    where training ran."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    accum_steps: int = 1
    grad_checkpointing: bool = False
    shots: int | None = None
    eval_every: int = 0
    report_to: tuple[str, ...] = ()
    epochs: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    stages: list[dict[str, Any]] = field(default_factory=list)
    total_steps: int = 0
    world_size: int = 1
    data: DataRecord = field(default_factory=DataRecord)
    evaluations: list[HeldoutEvaluation] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class MergedTraining:
    """A merged run trained nothing itself: where it was merged and the steps its runs trained."""

    merged: bool = True  # what tells it from a TrainingRecord
    device: str
    total_steps: int


@dataclass(frozen=True)
class AlphaRecord:
    """How alpha (or the task-vector coefficient) was chosen, with every evaluation on the way."""

    mode: str  # auto | fixed
    chosen: float
    rule: str
    tolerance: float
    tolerances: dict[str, float] = field(default_factory=dict, kw_only=True)  # each supported task's, in points
    search: str  # golden | grid | fixed
    evaluations: int
    grid: list[float]
    warning: str | None
    curve: list[CurvePoint]
    zeroshot_val_accuracy: dict[str, float]
    # what alpha is, where it is not the interpolation weight
    parameter: str | None = field(default=None, metadata=OMIT_NONE)
    steps: list[SelectionStep] | None = field(default=None, metadata=OMIT_NONE)

    def __post_init__(self) -> None:
        if not 0.0 <= self.chosen <= 1.0:
            raise ValueError(f"alpha.chosen {self.chosen!r} is not a number in [0, 1]")


@dataclass(frozen=True)
class Manifest:
    """manifest.json (format patcher-run/1)."""

    format: str
    name: str
    options_sha256: str
    model: BaseModel
    tasks: dict[str, TaskRecord]
    patch_tasks: list[str]
    support_tasks: list[str]
    monitor_tasks: list[str] = field(default_factory=list, kw_only=True)
    method: MethodRecord
    multi: MultiRecord | None
    text_tower: TextTower
    training: TrainingRecord | MergedTraining
    alpha: AlphaRecord
    test_accuracy: dict[str, dict[str, float]]
    test_macro_f1: dict[str, dict[str, float]] = field(default_factory=dict, kw_only=True)
    test_worst_class_accuracy: dict[str, dict[str, float]] = field(default_factory=dict, kw_only=True)
    files: dict[str, FileRecord]
    versions: dict[str, str]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("no run name")
        if not self.tasks:
            raise ValueError("no tasks")
        for key in ("patch_tasks", "support_tasks", "monitor_tasks"):
            if not all(name in self.tasks for name in getattr(self, key)):
                raise ValueError(f"{key} names tasks the manifest does not describe")

    def classnames(self, task: str) -> list[str]:
        """A task's class names."""
        return list(self.tasks[task].classnames)

    def alpha_of(self, kind: str) -> float:
        """The interpolation weight of a stored model: 0 for zero-shot, 1 fine-tuned, the chosen alpha patched."""
        return {"zeroshot": 0.0, "finetuned": 1.0}.get(kind, float(self.alpha.chosen))


def options_sha256(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the options that determine a result."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def files_record(staging: Path, left_out: tuple[str, ...] = ()) -> dict[str, FileRecord]:
    """sha256 and size of every file in a staging directory (the manifest's `files`); checkpoints, reports (curves
    with wall-clock times), the resume record, the timings and the manifest itself left out."""
    skipped = {MANIFEST, TIMINGS, FINGERPRINT, *left_out}
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name not in skipped
                   and not {CHECKPOINTS, REPORTS} & set(p.relative_to(staging).parts))
    return {str(p.relative_to(staging)): FileRecord.of(p) for p in files}


def write_manifest(staging: Path, manifest: Manifest) -> None:
    """Write manifest.json: last, because a staging directory that holds one is complete."""
    write_json(staging / MANIFEST, to_json(manifest))


@dataclass(frozen=True)
class Run:
    """A finished run directory whose manifest has been read and checked."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        """The run's name, as recorded when it was built."""
        return self.manifest.name

    @property
    def tasks(self) -> list[str]:
        """Every task whose head the run carries, patch tasks first."""
        return list(self.manifest.tasks)

    @property
    def timings(self) -> dict[str, Any]:
        """timings.json's content (created, timings_s), empty for a run that has none."""
        try:
            return json.loads((self.path / TIMINGS).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @cached_property
    def manifest_sha256(self) -> str:
        """sha256 of manifest.json, which names everything else by hash."""
        return sha256_file(self.path / MANIFEST)

    def verified_file(self, relative: str) -> Path:
        """Path of a file the manifest lists, after checking its sha256 against the manifest."""
        record = self.manifest.files.get(relative)
        path = self.path / relative
        if record is None:
            raise PatcherError(f"{self.path} has no {relative} in its manifest: rebuild the run")
        if not path.is_file():
            raise PatcherError(f"{path} is missing: the run is incomplete, rebuild it")
        if sha256_file(path) != record.sha256:
            raise PatcherError(f"{path} does not match the sha256 in its manifest: the file is corrupt or edited")
        return path

    def verified_json(self, relative: str) -> dict[str, Any]:
        """A JSON file the manifest lists, read after its hash is checked."""
        return json.loads(self.verified_file(relative).read_text())


def read_manifest(path: Path) -> Manifest:
    """manifest.json as a Manifest; PatcherError naming the first field that is missing or wrong."""
    data = read_json_record(path, RUN_FORMAT, "rebuild the run")
    try:
        return from_json(Manifest, data)
    except RecordError as error:
        raise PatcherError(f"{path} is damaged or was edited by hand: {error}: rebuild the run "
                           "(or restore the manifest the build wrote)") from None


def load_run(path: Path | str) -> Run:
    """Read a run directory's manifest, refusing anything that is not a complete patcher run."""
    path = Path(path)
    if not path.is_dir():
        raise PatcherError(f"{path} is not a directory: pass a run directory written by `patcher build`")
    if not (path / MANIFEST).is_file():
        raise PatcherError(f"{path} is not a patcher run (no {MANIFEST}): pass a directory from `patcher build`")
    return Run(path=path, manifest=read_manifest(path / MANIFEST))
