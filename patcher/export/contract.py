"""The contract between `patcher export` and everything that serves its output: tensor names, file names, and
export.json as a typed record with one reader and one writer. Imports no torch and no onnx, so that
`patcher triton`, `patcher serve` and `patcher classify` stay light.

    RUN/onnx/export.json        ExportRecord: the run it came from, preprocessing, tensors, tasks, models, parity
    RUN/onnx/<key>.onnx         key = model_key(kind, precision): patched, zeroshot, patched_fp16, ...
    RUN/onnx/samples/<task>.png a real held-out image per task (servers warm new versions up with it)

Every graph takes `image` [N, 3, H, W] float32 (CLIP-normalised) and returns `embedding` [N, D] (L2-normalised)
and `logits_<task>` [N, C] per task, task names made tensor-safe by `tensor_name`.

    RUN/onnx/text_<kind>.onnx   the text tower (TextExport): `tokens` [N, context] int64 -> `text_embedding` [N, D]
    RUN/onnx/bpe_simple_vocab_16e6.txt.gz   open_clip's tokenizer vocabulary (TokenizerSpec says how to use it)

With the text tower, a label set's head is `logit_scale * normalize(mean over templates of text_embedding)` per
label, so that `logits = embedding @ head` (the heads baked into the image graphs are these, at build time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.files import read_json_record, sha256_file, write_json
from patcher.base.records import OMIT_NONE, RecordError, from_json, to_json
from patcher.runs.manifest import Preprocess

EXPORT_FORMAT = "patcher-export/1"
EXPORT_JSON = "export.json"
INPUT_NAME = "image"
EMBEDDING_OUTPUT = "embedding"
TEXT_INPUT = "tokens"
TEXT_OUTPUT = "text_embedding"
PRECISIONS = ("fp32", "fp16", "int8")
REMEDY = "run `patcher export` again"
SAMPLES_DIR = "samples"


def tensor_name(task: str) -> str:
    """A task name made safe for ONNX and Triton tensor and model names (`fashion-mnist` -> `fashion_mnist`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", task)


def logits_output(task: str) -> str:
    """The name of a task's logits output in exported graphs."""
    return f"logits_{tensor_name(task)}"


def output_names(tasks: list[str]) -> list[str]:
    """The outputs of a graph for these tasks; PatcherError when two tasks map to one tensor name."""
    names = [EMBEDDING_OUTPUT, *(logits_output(task) for task in tasks)]
    if len(set(names)) != len(names):
        raise PatcherError(f"tasks {', '.join(tasks)} give clashing output names {names}: export them separately")
    return names


def model_key(kind: str, precision: str) -> str:
    """The key and file stem of a model: `patched`, `zeroshot_fp16`, ..."""
    return kind if precision == "fp32" else f"{kind}_{precision}"


@dataclass(frozen=True)
class TensorEntry:
    """A graph input or output: name, dtype, shape with -1 for the batch."""

    name: str
    dtype: str
    shape: list[int]
    task: str | None = field(default=None, metadata=OMIT_NONE)  # the task of a logits output


@dataclass(frozen=True)
class ExportedTask:
    """A task of the export: its role in the run, class names in output order, and its logits output."""

    role: str
    classnames: list[str]
    output: str


@dataclass(frozen=True, kw_only=True)
class ExportedModel:
    """One ONNX file of the export."""

    file: str
    sha256: str
    bytes: int
    precision: str
    model: str  # patched | zeroshot
    alpha: float
    optimization: str


@dataclass(frozen=True, kw_only=True)
class ExportedSample:
    """A real held-out image of one task (PNG at the model's input size) and its label index."""

    file: str
    sha256: str
    label: int


@dataclass(frozen=True)
class SourceRun:
    """The run an export came from."""

    name: str
    manifest_sha256: str
    model: str


@dataclass(frozen=True, kw_only=True)
class ContentOptions:
    """The options that decide an export's content: a second export with the same ones is up to date."""

    tasks: list[str]
    fp16: bool
    optimize: bool
    opset: int
    images_per_task: int
    int8: bool = False
    text_tower: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """How prompts become the text model's `tokens`: open_clip's SimpleTokenizer over this vocabulary file."""

    vocabulary: str  # file name in the export directory
    vocabulary_sha256: str
    context_length: int  # tokens per prompt, start and end included; open_clip truncates longer prompts
    clean: str = "lower"  # open_clip's cleaning: lower | whitespace | canonicalize
    kind: str = "open_clip.SimpleTokenizer"

    def __post_init__(self) -> None:
        if self.context_length < 3:
            raise ValueError(f"context_length {self.context_length} is too short for a prompt")
        if self.clean not in ("lower", "whitespace", "canonicalize"):
            raise ValueError(f"clean {self.clean!r} is not lower, whitespace or canonicalize")


@dataclass(frozen=True, kw_only=True)
class TextModel:
    """One exported text tower: the file, the model it belongs to, and the logit scale its heads carry."""

    file: str
    sha256: str
    bytes: int
    model: str  # patched | zeroshot
    alpha: float  # the interpolation weight of its weights (0: the zero-shot text tower)
    trained: bool  # False: the base model's text tower (the method trained the image encoder only)
    logit_scale: float  # exp(logit_scale) of the CLIP model: head = logit_scale * normalize(class embedding)


@dataclass(frozen=True)
class TextExport:
    """The text tower of an export: tensors, tokenizer, one model per exported kind, the run's prompt templates
    and its parity report."""

    input: TensorEntry
    output: TensorEntry
    tokenizer: TokenizerSpec
    models: dict[str, TextModel]
    templates: dict[str, list[str]]  # each task's prompt templates, as the run built its heads
    parity: dict[str, Any]

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no text models")


@dataclass(frozen=True)
class ExportRecord:
    """export.json (format patcher-export/1)."""

    format: str
    run: SourceRun
    alpha: float
    opset: int
    exporter: str
    options: ContentOptions
    preprocess: Preprocess
    input: TensorEntry
    outputs: list[TensorEntry]
    tasks: dict[str, ExportedTask]
    models: dict[str, ExportedModel]
    parity: dict[str, Any]
    versions: dict[str, str]
    timings_s: dict[str, float]
    created: str
    samples: dict[str, ExportedSample] = field(default_factory=dict)  # absent in exports made before samples
    text: TextExport | None = field(default=None, metadata=OMIT_NONE)  # the text tower, when exported

    def __post_init__(self) -> None:
        if not self.tasks or not self.models:
            raise ValueError("no tasks or no models")

    @property
    def patch_task(self) -> str:
        """The first task with role "patch", else the first task."""
        patch = [task for task, info in self.tasks.items() if info.role == "patch"]
        return (patch or list(self.tasks))[0]

    def model(self, kind: str, precision: str = "fp32") -> ExportedModel | None:
        """The record of `kind` at `precision`, None when the export has none."""
        return self.models.get(model_key(kind, precision))


def tensor_entries(preprocess: Preprocess, widths: dict[str, int], tasks: list[str]) -> tuple[TensorEntry,
                                                                                             list[TensorEntry]]:
    """The graph's input and outputs as export.json lists them (-1 for the batch)."""
    height, width = preprocess.image_size
    outputs = [TensorEntry(EMBEDDING_OUTPUT, "float32", [-1, widths[EMBEDDING_OUTPUT]])]
    outputs += [TensorEntry(logits_output(task), "float32", [-1, widths[logits_output(task)]], task) for task in tasks]
    return TensorEntry(INPUT_NAME, "float32", [-1, 3, int(height), int(width)]), outputs


def text_entries(context_length: int, width: int) -> tuple[TensorEntry, TensorEntry]:
    """The text graph's input and output as export.json lists them (-1 for the batch)."""
    return (TensorEntry(TEXT_INPUT, "int64", [-1, int(context_length)]),
            TensorEntry(TEXT_OUTPUT, "float32", [-1, int(width)]))


def text_file(kind: str) -> str:
    """The file name of a kind's text tower in the export directory."""
    return f"text_{kind}.onnx"


def read_export_record(path: Path) -> ExportRecord:
    """export.json as an ExportRecord; PatcherError naming what is missing or wrong."""
    data = read_json_record(path, EXPORT_FORMAT, REMEDY)
    try:
        return from_json(ExportRecord, data)
    except RecordError as error:
        raise PatcherError(f"{path} is damaged or was edited by hand: {error}: {REMEDY}") from None


def write_export_record(path: Path, record: ExportRecord) -> None:
    """Write export.json whole or not at all."""
    write_json(path, to_json(record))


def verified_text_file(export_dir: Path, record: ExportRecord, kind: str = "patched") -> Path:
    """The text tower of `kind`, after checking its sha256 against export.json; PatcherError for an export without."""
    text = record.text
    if text is None or kind not in text.models:
        raise PatcherError(f"{export_dir / EXPORT_JSON} has no {kind} text tower: run `patcher export` again "
                           "(without --no-text)")
    return _verified(export_dir, text.models[kind].file, text.models[kind].sha256)


def verified_vocabulary(export_dir: Path, record: ExportRecord) -> Path:
    """The tokenizer's vocabulary file of an export with a text tower, after checking its sha256."""
    if record.text is None:
        raise PatcherError(f"{export_dir / EXPORT_JSON} has no text tower: run `patcher export` again")
    spec = record.text.tokenizer
    return _verified(export_dir, spec.vocabulary, spec.vocabulary_sha256)


def _verified(export_dir: Path, file: str, sha256: str) -> Path:
    path = export_dir / file
    if not path.is_file():
        raise PatcherError(f"{path} is missing: the export is incomplete, {REMEDY}")
    if sha256_file(path) != sha256:
        raise PatcherError(f"{path} does not match the sha256 in {EXPORT_JSON}: {REMEDY}")
    return path


def verified_model_file(export_dir: Path, record: ExportRecord, kind: str, precision: str = "fp32") -> Path:
    """The ONNX file of `kind` at `precision`, after checking its sha256 against export.json."""
    entry = record.model(kind, precision)
    if entry is None:
        raise PatcherError(f"{export_dir / EXPORT_JSON} has no {precision} {kind} model: export it first "
                           f"(`patcher export` with {precision}) or pass --precision fp32")
    path = export_dir / entry.file
    if not path.is_file():
        raise PatcherError(f"{path} is missing: the export is incomplete, {REMEDY}")
    if sha256_file(path) != entry.sha256:
        raise PatcherError(f"{path} does not match the sha256 in {EXPORT_JSON}: {REMEDY}")
    return path
