"""Label sets given at request time: checked, turned into prompts, into a head, and kept in a bounded cache.

A label set's head is open_clip's zero-shot classifier: per label, the mean of its prompts' normalised text
embeddings, normalised, times the logit scale, so that `scores = normalize(image embedding) @ head` are logits
like the baked tasks'. The export checks the heads it makes this way against the build's; `patcher triton` copies
this file beside the open-vocabulary model's model.py (as `patcher_openvocab.py`), and `patcher classify --run`
imports it: one implementation everywhere. Imports numpy and the standard library only.
"""

from __future__ import annotations

import string
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_TEMPLATES = ("{}",)  # no templates given: the label itself is the prompt
# Per request, checked before any prompt is built: a text tower embeds about 600 prompts a second on a shared
# 2-core CPU with the tiny model, so the largest request the limits allow is answered within seconds.
MAX_PROMPTS = 1024  # labels x templates
DEFAULT_LIMITS = {"max_labels": 1000, "max_templates": 100, "max_prompts": MAX_PROMPTS, "label_cache": 64}
MAX_PROMPT_BYTES = 4096  # one prompt (a label put into a template)
MAX_REQUEST_PROMPT_BYTES = 64 << 10  # every prompt of a request together


class LabelSetError(ValueError):
    """A label set the model refuses; the message names the item and the limit."""


@dataclass(frozen=True)
class LabelSet:
    """Labels and the templates that make their prompts (each with one `{}`)."""

    labels: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def prompts(self) -> list[str]:
        """Every prompt, label-major (open_clip's order): label 0 with each template, then label 1, ..."""
        return [template.format(label) for label in self.labels for template in self.templates]

    def source(self, prompt_index: int) -> str:
        """Which label and template prompt `prompt_index` came from, for error messages."""
        label = self.labels[prompt_index // len(self.templates)]
        template = self.templates[prompt_index % len(self.templates)]
        return f"label {_shown(label)} with template {_shown(template)}"


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _text(item: bytes | str, what: str, index: int) -> str:
    if isinstance(item, str):
        return item
    try:
        return bytes(item).decode("utf-8")
    except UnicodeDecodeError as error:
        raise LabelSetError(f"{what} {index} is not UTF-8 (byte {error.start}: "
                            f"{bytes(item)[error.start:error.start + 1]!r})") from None


def check_template(template: str, index: int) -> str:
    """A template with exactly one bare `{}` (no format specifier, no conversion) and literal text around it;
    LabelSetError otherwise."""
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as error:
        raise LabelSetError(f"template {index} {_shown(template)} is not a format string ({error}): write the label "
                            "as {} and any literal brace as {{ or }}") from None
    if [field for field, _, _ in fields] != [""]:
        raise LabelSetError(f"template {index} {_shown(template)} must hold exactly one {{}} for the label, "
                            f"it has {len(fields)} replacement fields {[field for field, _, _ in fields]}")
    _, spec, conversion = fields[0]
    if spec or conversion:
        raise LabelSetError(f"template {index} {_shown(template)} must hold a bare {{}} for the label, without a "
                            "format specifier or conversion (:... or !...)")
    return template


def _check_sizes(labels: list[str], templates: tuple[str, ...], max_prompts: int) -> None:
    """The prompts' count and bytes, computed from the labels and templates without building a prompt."""
    if len(labels) * len(templates) > max_prompts:
        raise LabelSetError(f"{len(labels)} labels x {len(templates)} templates make {len(labels) * len(templates)} "
                            f"prompts, more than max_prompts={max_prompts} a request: send fewer labels or templates")
    label_bytes = [len(label.encode("utf-8")) for label in labels]
    template_bytes = [len(template.encode("utf-8")) - 2 for template in templates]  # the `{}` is replaced
    if max(label_bytes) + max(template_bytes) > MAX_PROMPT_BYTES:
        longest = labels[label_bytes.index(max(label_bytes))]
        raise LabelSetError(f"label {_shown(longest)} makes a prompt of {max(label_bytes) + max(template_bytes)} "
                            f"bytes, more than max_prompt_bytes={MAX_PROMPT_BYTES}")
    total = sum(label_bytes) * len(templates) + sum(template_bytes) * len(labels)
    if total > MAX_REQUEST_PROMPT_BYTES:
        raise LabelSetError(f"the request's prompts hold {total} bytes, more than {MAX_REQUEST_PROMPT_BYTES} a "
                            "request: send fewer or shorter labels or templates")


def _has_text(label: str) -> bool:
    """Whether a label holds anything a tokenizer keeps: not only spaces, control or format characters."""
    return any(not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Co", "Cn")
               for char in label)


def check_label_set(labels: list[bytes] | list[str], templates: list[bytes] | list[str] | None,
                    max_labels: int, max_templates: int, max_prompts: int = MAX_PROMPTS) -> LabelSet:
    """The label set of a request; LabelSetError naming the first label or template refused and the limit, before
    any prompt is built."""
    if len(labels) == 0:
        raise LabelSetError("the label set is empty: give at least one label")
    if len(labels) > max_labels:
        raise LabelSetError(f"{len(labels)} labels exceed max_labels={max_labels}")
    decoded = [_text(item, "label", index) for index, item in enumerate(labels)]
    seen: dict[str, int] = {}
    for index, label in enumerate(decoded):
        if not label.strip():
            raise LabelSetError(f"label {index} is empty")
        if not _has_text(label):
            raise LabelSetError(f"label {index} {_shown(label)} holds only control or format characters, which "
                                "the tokenizer drops: give a label with letters or digits")
        if label in seen:
            raise LabelSetError(f"label {index} {_shown(label)} repeats label {seen[label]}")
        seen[label] = index
    if templates is None:
        _check_sizes(decoded, DEFAULT_TEMPLATES, max_prompts)
        return LabelSet(tuple(decoded))
    if len(templates) == 0:
        raise LabelSetError("the template list is empty: give at least one template with {}, or none")
    if len(templates) > max_templates:
        raise LabelSetError(f"{len(templates)} templates exceed max_templates={max_templates}")
    checked = tuple(check_template(_text(item, "template", index), index) for index, item in enumerate(templates))
    _check_sizes(decoded, checked, max_prompts)
    return LabelSet(tuple(decoded), checked)


def class_heads(embeddings: np.ndarray, classes: int, templates: int, scale: float) -> np.ndarray:
    """[D, C] float32 heads from prompt embeddings in label-major order: per class, the normalised mean of its
    templates' normalised embeddings, times the logit scale (open_clip's zero-shot classifier)."""
    rows = np.asarray(embeddings, dtype=np.float32)
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    means = rows.reshape(classes, templates, -1).mean(axis=1)
    heads = (means / np.linalg.norm(means, axis=1, keepdims=True)).T * np.float32(scale)
    return np.ascontiguousarray(heads, dtype=np.float32)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """[N, L] softmax of each row of logits over the request's labels (float32, rows sum to 1)."""
    shifted = np.asarray(scores, dtype=np.float64)
    shifted = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def ranked_labels(probs: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
    """[N, L] UTF-8 strings `"probability:index:label"`, most probable first: Triton's classification format with
    the request's own labels, which the server's `class_count` cannot know."""
    order = np.argsort(-probs, axis=1, kind="stable")
    rows = [[f"{probs[row, index]:.6f}:{index}:{labels[index]}".encode() for index in ranking]
            for row, ranking in enumerate(order)]
    return np.array(rows, dtype=np.object_).reshape(probs.shape)


class HeadCache:
    """The heads of the last `capacity` label sets, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"label_cache must be 0 or more, got {capacity}")
        self.capacity = capacity
        self.heads: OrderedDict[LabelSet, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, label_set: LabelSet) -> np.ndarray | None:
        """The cached head of a label set, or None (counted as a miss)."""
        head = self.heads.get(label_set)
        if head is None:
            self.misses += 1
            return None
        self.heads.move_to_end(label_set)
        self.hits += 1
        return head

    def put(self, label_set: LabelSet, head: np.ndarray) -> None:
        """Keep a head, dropping the least recently used beyond capacity."""
        if self.capacity == 0:
            return
        self.heads[label_set] = head
        self.heads.move_to_end(label_set)
        while len(self.heads) > self.capacity:
            self.heads.popitem(last=False)


def rank(scores: np.ndarray, labels: tuple[str, ...], top_k: int,
         probs: np.ndarray | None = None) -> list[list[dict]]:
    """Per image, the top-k labels with their index, score (logit) and probability (softmax over all the labels,
    computed here unless the server's are given), best first (the baked tasks' answer shape)."""
    probs = probabilities(scores) if probs is None else probs
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return [[{"label": labels[i], "index": int(i), "score": float(row[i]), "probability": float(p[i])} for i in best]
            for row, p, best in zip(scores, probs, order, strict=True)]
