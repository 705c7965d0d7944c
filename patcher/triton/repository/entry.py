"""The models one `patcher triton` entry consists of, and the rules for their names.

An entry `<name>` is one export served as:

    <name>                 ensemble: encoded images in, embedding and every task's labelled logits out
    <name>_preprocess      python: encoded images -> CLIP-normalised tensors (bounded inputs)
    <name>_patched         the patched classifier: normalised tensors in, embedding and logits out
    <name>_zeroshot        the zero-shot classifier, same tensors
    <name>_pixels          the patched classifier taking raw 0-255 pixels (NCHW), normalising inside the graph
    <name>_<task>_pixels   per task, Triton's image-classification convention: pixels in, one labelled output
    <name>_<task>_bytes    per task: encoded images in, one labelled output
    <name>_<kind>          an extra classifier written beside them (e.g. the bench's output-space ensemble)

and, when the export has a text tower (repository/openvocab_models.py):

    <name>_text            python: prompts -> text embeddings (the patched model's text tower, tokenised inside)
    <name>_classify        python: images and a label set (and templates) in -> a score per label, heads cached
    <name>_embed           ensemble: raw 0-255 pixels (FORMAT_NCHW) in, the image embedding out (NVIDIA's conventions)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.export.contract import logits_output, tensor_name

MAX_NAME = 64  # leaves room for the longest suffix within one file name, and reads well in URLs
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
# Triton's python backend starts each model as `bash -c "exec <stub> <repository>/<model>/<version>/model.py ..."`,
# the path unquoted: a space splits it, quotes and $ are the shell's, non-ASCII fails in the stub.
SAFE_PATH = re.compile(r"[A-Za-z0-9/._+,:@=-]+")
SAFE_PATH_WORDS = "ASCII letters, digits and / . _ - + , : @ ="
COMPOSING = ("preprocess", "patched", "zeroshot", "pixels")  # loaded before the ensembles that use them
OPEN_VOCABULARY = ("text", "classify")  # python models of an entry with a text tower; "embed" is an ensemble


@dataclass(frozen=True)
class Model:
    """One Triton model of an entry: its name, kind and (per-task models) task."""

    name: str
    kind: str  # ensemble, preprocess, patched, zeroshot, pixels, task_pixels, task_bytes, or an extra classifier
    task: str | None = None

    @property
    def is_ensemble(self) -> bool:
        """True for the models that only route tensors (no backend process of their own)."""
        return self.kind in ("ensemble", "task_pixels", "task_bytes", "embed")


def check_entry_name(name: str) -> str:
    """An entry name as given, or PatcherError: letters, digits and `_` only, at most MAX_NAME characters."""
    if len(name) > MAX_NAME:
        raise PatcherError(f"--name {name[:24]}... is {len(name)} characters long: use at most {MAX_NAME}")
    if not NAME.fullmatch(name):
        suggestion = tensor_name(name).lstrip("_") or "model"
        raise PatcherError(f"--name {name!r} is not a Triton model name patcher writes: use letters, digits and _ "
                           f"(starting with a letter or digit), e.g. {suggestion[:MAX_NAME]!r}")
    return name


def check_repository_path(path: Path, what: str = "model repository") -> None:
    """PatcherError, before any work, for a local path tritonserver's python backend cannot start models from."""
    text = str(Path(path).absolute())
    if SAFE_PATH.fullmatch(text):
        return
    bad = next(c for c in text if not SAFE_PATH.fullmatch(c))
    shown = {" ": "a space", "\t": "a tab"}.get(bad, repr(bad))
    raise PatcherError(f"{what} path {text} contains {shown}, which tritonserver cannot start python models from "
                       f"(it passes the path to a shell unquoted): use a path of {SAFE_PATH_WORDS} only")


@dataclass(frozen=True)
class Entry:
    """The models of one entry: `name` and the tasks of the export, in output order."""

    name: str
    tasks: tuple[str, ...]
    extra: tuple[str, ...] = ()  # kinds of extra classifiers, served like the patched one
    open_vocabulary: bool = False  # the export has a text tower: text, classify and embed models

    def task_output(self, task: str) -> str:
        """The logits output of a task."""
        return logits_output(task)

    def models(self) -> list[Model]:
        """Every model, composing models first (the order to load them in)."""
        name = self.name
        open_vocabulary = OPEN_VOCABULARY if self.open_vocabulary else ()
        models = [Model(f"{name}_{kind}", kind) for kind in (*COMPOSING, *self.extra, *open_vocabulary)]
        models.append(Model(name, "ensemble"))
        for task in self.tasks:
            safe = tensor_name(task)
            models += [Model(f"{name}_{safe}_pixels", "task_pixels", task),
                       Model(f"{name}_{safe}_bytes", "task_bytes", task)]
        if self.open_vocabulary:
            models.append(Model(f"{name}_embed", "embed"))
        seen: dict[str, Model] = {}
        for model in models:
            if model.name in seen:
                raise PatcherError(f"entry {name!r}: model names collide ({model.name} for {model.kind} and "
                                   f"{seen[model.name].kind}): choose another --name")
            seen[model.name] = model
        return models

    def model(self, kind: str) -> str:
        """The name of the entry's single model of `kind` (preprocess, patched, zeroshot, pixels, ensemble)."""
        return next(m.name for m in self.models() if m.kind == kind)
