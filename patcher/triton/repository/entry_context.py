"""What every builder of one entry reads (`EntryContext`) and makes (`ModelPlan`), and the serving options they
share (`Options`): one builder per model kind lives in builders.py and openvocab_models.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.records import to_json
from patcher.triton.repository.configs import ENTRY_PARAMETER, IMAGE_BYTES, NUMPY_TYPES, Batching, Step, TensorRT
from patcher.triton.repository.entry import Entry, Model
from patcher.triton.repository.export_info import ExportInfo, TensorSpec
from patcher.triton.repository.pixels import PIXELS_INPUT

TEMPLATES = Path(__file__).parent / "templates"
IMAGING = Path(__file__).parents[1] / "imaging.py"
IMAGING_FILE = "patcher_imaging.py"  # the name the preprocessing model imports it by
IMAGE_FORMAT = "FORMAT_NCHW"
# A version file: a file to copy, a text to write, or a function that writes the file at the path it is given.
Source = Path | str | Callable[[Path], Any]


def python_model(template: str, *, imaging: bool = False) -> dict[str, Source]:
    """A python-backend model's version files: its model.py from templates/, and the imaging module it imports as
    `patcher_imaging` when it decodes images."""
    files: dict[str, Source] = {"model.py": (TEMPLATES / template).read_text()}
    if imaging:
        files[IMAGING_FILE] = IMAGING.read_text()
    return files


@dataclass
class ModelPlan:
    """One model to write: its configuration, labels files (name -> class names) and version files."""

    model: Model
    config: mc.ModelConfig
    labels: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, Source] = field(default_factory=dict)
    model_files: dict[str, bytes] = field(default_factory=dict)  # other model-level files, e.g. warmup/<input>


@dataclass(frozen=True)
class Options:
    """How the entry is served: backend flavour, batching, precision, preprocessing limits, onnxruntime threads,
    and extra classifiers (kind -> ONNX file with the patched model's tensors, served as `<entry>_<kind>`)."""

    backend: str = "python"
    batching: Batching = field(default_factory=Batching)
    tensorrt: TensorRT | None = None
    precision: str = "fp32"
    limits: dict[str, Any] = field(default_factory=dict)
    intra_op_threads: int = 0  # 0: onnxruntime's default (all cores)
    extra_classifiers: dict[str, Path] = field(default_factory=dict)
    open_vocab: dict[str, Any] = field(default_factory=dict)  # label-set limits of the open-vocabulary models


def task_outputs(info: ExportInfo) -> dict[str, str]:
    """task -> logits output name."""
    return {task: record.output for task, record in info.record.tasks.items()}


@dataclass(frozen=True, kw_only=True)
class EntryContext:
    """What every builder of one entry reads: the export, its checked tensors, labels and shared parameters."""

    info: ExportInfo
    entry: Entry
    options: Options
    files: dict[str, Path]
    image: TensorSpec
    outputs: list[TensorSpec]
    record: str

    @property
    def task_outputs(self) -> dict[str, str]:
        """task -> logits output name."""
        return task_outputs(self.info)

    @property
    def labels(self) -> dict[str, str]:
        """logits output -> its labels file."""
        return {output: f"{output}_labels.txt" for output in self.task_outputs.values()}

    @property
    def preprocess(self) -> dict[str, Any]:
        """export.json's preprocessing, with the numpy dtype the classifiers take."""
        return {**to_json(self.info.record.preprocess), "dtype": NUMPY_TYPES[self.image.data_type].__name__}

    @property
    def pixels(self) -> TensorSpec:
        """The raw-pixels input of the pixels models (same shape and type as the normalised image)."""
        return TensorSpec(PIXELS_INPUT, self.image.data_type, self.image.shape)

    def name(self, kind: str) -> str:
        """The model name of the entry's single model of `kind`."""
        return self.entry.model(kind)

    def common(self) -> dict[str, Any]:
        """Parameters every model carries: its entry and the run it came from."""
        return {ENTRY_PARAMETER: self.entry.name, "run": self.info.record.run.name}

    def described(self) -> dict[str, Any]:
        """Parameters of the models clients discover tasks from."""
        return {**self.common(), "tasks": self.task_outputs, "preprocess_model": self.name("preprocess")}

    def output(self, task: str) -> TensorSpec:
        """A task's logits output."""
        wanted = self.task_outputs[task]
        return next(spec for spec in self.outputs if spec.name == wanted)

    def plan(self, model: Model, config: mc.ModelConfig, files: dict[str, Source] | None = None) -> ModelPlan:
        """A model's plan: its config, the labels files its outputs name, the version record and `files`."""
        label_text = {self.labels[output]: list(self.info.record.tasks[task].classnames)
                      for task, output in self.task_outputs.items()}
        used = {o.label_filename for o in config.output if o.label_filename}
        return ModelPlan(model=model, config=config, labels={f: t for f, t in label_text.items() if f in used},
                         files={"patcher.json": self.record, **(files or {})})

    def bytes_steps(self, outputs: dict[str, str]) -> list[Step]:
        """Encoded images through the preprocessing model, then the patched classifier's `outputs`."""
        image = self.image.name
        return [Step(self.name("preprocess"), {IMAGE_BYTES: IMAGE_BYTES}, {image: image}),
                Step(self.name("patched"), {image: image}, outputs)]
