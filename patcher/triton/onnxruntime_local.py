"""A run's exported models in this process, without a server: what `patcher classify --run` and `patcher embed --run`
use. The same code paths as the served models (imaging.py, the tokenizer, the label-set heads), onnxruntime, no
torch: for quick checks and for users without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.base.records import to_json
from patcher.export.contract import (
    EMBEDDING_OUTPUT,
    EXPORT_JSON,
    INPUT_NAME,
    TEXT_INPUT,
    TEXT_OUTPUT,
    ExportRecord,
    read_export_record,
    verified_model_file,
    verified_text_file,
    verified_vocabulary,
)
from patcher.export.openvocab import LabelSet, LabelSetError, check_label_set, class_heads, rank
from patcher.export.tokenizer import ClipTokenizer, PromptError
from patcher.triton.imaging import preprocess_bytes
from patcher.triton.item_errors import ItemError, item_error

BATCH = 64


def export_directory(path: Path) -> Path:
    """The export directory of a run directory (RUN/onnx) or an export directory itself; PatcherError otherwise."""
    path = Path(path)
    for candidate in (path, path / "onnx"):
        if (candidate / EXPORT_JSON).is_file():
            return candidate
    raise PatcherError(f"{path} holds no export ({EXPORT_JSON}): run `patcher export {path}` first")


class LocalModel:
    """The patched model of an export (image graph, and the text tower when exported) in onnxruntime."""

    def __init__(self, path: Path, kind: str = "patched") -> None:
        import onnxruntime as ort

        self.path = export_directory(path)
        self.record: ExportRecord = read_export_record(self.path / EXPORT_JSON)
        self.kind = kind
        self.spec = {**to_json(self.record.preprocess), "dtype": "float32"}
        image_file = verified_model_file(self.path, self.record, kind)
        self.image = ort.InferenceSession(str(image_file), providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.image.get_outputs()]
        self.text: Any = None
        self.tokenizer: ClipTokenizer | None = None
        if self.record.text is not None:
            text = self.record.text
            self.text = ort.InferenceSession(str(verified_text_file(self.path, self.record, kind)),
                                             providers=["CPUExecutionProvider"])
            self.tokenizer = ClipTokenizer(verified_vocabulary(self.path, self.record), text.tokenizer.context_length,
                                           text.tokenizer.clean)

    @property
    def templates(self) -> dict[str, list[str]]:
        """The prompt templates of the run's tasks."""
        return dict(self.record.text.templates) if self.record.text is not None else {}

    @property
    def logit_scale(self) -> float:
        """What the label-set heads are scaled by: the CLIP model's exp(logit_scale)."""
        if self.record.text is None:
            raise PatcherError(f"{self.path / EXPORT_JSON} has no text tower: run `patcher export` again")
        return self.record.text.models[self.kind].logit_scale

    def _images(self, blobs: Sequence[bytes], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        results = []
        for start in range(0, len(blobs), BATCH):
            try:
                batch = preprocess_bytes(list(blobs[start : start + BATCH]), self.spec)
            except ValueError as error:
                item = _item(error)
                named = item.named(list(names[start:]), "is not a readable image") if item else None
                raise PatcherError(named or str(error)) from None
            results.append(dict(zip(self.outputs, self.image.run(self.outputs, {INPUT_NAME: batch}), strict=True)))
        return results

    def embed_images(self, blobs: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised image embeddings of encoded images."""
        return np.concatenate([part[EMBEDDING_OUTPUT] for part in self._images(blobs, names)])

    def classify_tasks(self, blobs: Sequence[bytes], names: Sequence[str], top_k: int) -> list[dict[str, list]]:
        """Per image, each exported task's top-k labels (the baked heads)."""
        parts = self._images(blobs, names)
        results: list[dict[str, list]] = [{} for _ in blobs]
        for task, info in self.record.tasks.items():
            logits = np.concatenate([part[info.output] for part in parts])
            for row, ranked in enumerate(rank(logits, tuple(info.classnames), top_k)):
                results[row][task] = ranked
        return results

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised text embeddings of prompts (a prompt longer than the context is refused)."""
        try:
            return self._text_embeddings(texts)
        except ItemRefused as refused:
            raise PatcherError(str(refused.item)) from None

    def _text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """embed_texts, a refused prompt raised as ItemRefused numbered in `texts`."""
        if self.text is None or self.tokenizer is None:
            raise PatcherError(f"{self.path / EXPORT_JSON} has no text tower: run `patcher export` again "
                               "(without --no-text)")
        chunks = []
        for start in range(0, len(texts), BATCH):
            try:
                tokens = self.tokenizer(list(texts[start : start + BATCH]), truncate=False, strict=True)
            except PromptError as error:
                item = _item(error)
                if item is None:
                    raise PatcherError(str(error)) from None
                raise ItemRefused(item.shifted(start)) from None
            chunks.append(self.text.run([TEXT_OUTPUT], {TEXT_INPUT: tokens})[0])
        return np.concatenate(chunks) if chunks else np.zeros((0, self.record.text.output.shape[1]), np.float32)

    def head(self, label_set: LabelSet) -> np.ndarray:
        """The [D, L] head of a label set, from this export's text tower."""
        try:
            embeddings = self._text_embeddings(label_set.prompts())
        except ItemRefused as refused:
            raise PatcherError(f"{label_set.source(refused.item.index)}: {refused.item.reason}") from None
        return class_heads(embeddings, len(label_set.labels), len(label_set.templates), self.logit_scale)

    def classify_labels(self, blobs: Sequence[bytes], names: Sequence[str], label_set: LabelSet,
                        top_k: int) -> list[list[dict]]:
        """Per image, the label set's top-k labels and scores (logits, like the baked tasks')."""
        head = self.head(label_set)
        scores = self.embed_images(blobs, names) @ head
        return rank(scores, label_set.labels, top_k)


class ItemRefused(Exception):
    """One item of a call refused (inside LocalModel: the caller turns it into a PatcherError)."""

    def __init__(self, item: ItemError) -> None:
        super().__init__(str(item))
        self.item = item


def _item(error: Exception) -> ItemError | None:
    """The item an exception of the tokenizer or imaging names, when its message starts with one."""
    item = item_error(str(error))
    return item if item is not None and not item.context else None


def label_set(labels: Sequence[str], templates: Sequence[str] | None, max_labels: int = 1000,
              max_templates: int = 100) -> LabelSet:
    """A checked label set; PatcherError naming the label or template refused."""
    try:
        return check_label_set(list(labels), None if templates is None else list(templates), max_labels,
                               max_templates)
    except LabelSetError as error:
        raise PatcherError(str(error)) from None
