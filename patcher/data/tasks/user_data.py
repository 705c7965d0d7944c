"""What a user's datasets share (folder:, csv:, wds:): the spec, the task's short name, class names that cannot be
paired with the wrong images, and the parts present.

    [NAME=]KIND:LOCATION[?key=value&...]     folder:/data/shapes    shapes=csv:/data/labels.csv?img_key=path

A task is named NAME, by default the dataset's folder (or file) name: `shapes`, never its absolute path, so models
and tensors keep their names when the data moves. Its `source` is the spec without the name, with an absolute path:
what later stages (export, verify) reopen the data from.

Class names: each raw label (a class folder's name, a CSV label, a shard's label) read as the class name
(underscores as spaces), or mapped by DIR/classnames.txt, one `LABEL: NAME` line per label: every label named, every
line's label present, no name twice; anything else is refused, so a list in the wrong order cannot mislabel.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import patcher.data.tasks.templates as templates
from patcher.base.errors import PatcherError

KINDS = ("folder", "csv", "wds")
SPEC_HELP = "folder:DIR, csv:DIR or csv:FILE.csv, wds:DIR (tar shards), each optionally NAME=... first"
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
CLASS_MAP = "classnames.txt"
TEMPLATES = "templates.txt"
CSV_DEFAULTS = {"img_key": "filepath", "label_key": "label", "sep": ","}  # open_clip_train's column naming


@dataclass(frozen=True)
class Spec:
    """A parsed user-dataset spec: kind, location (absolute), the task name if given, and loader options."""

    kind: str
    location: Path
    name: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The spec without the name: what the manifest records and later stages reopen."""
        query = "&".join(f"{key}={value}" for key, value in sorted(self.options.items()))
        return f"{self.kind}:{self.location}" + (f"?{query}" if query else "")


def parse_spec(text: str, allowed: Mapping[str, tuple[str, ...]]) -> Spec | None:
    """The spec in `text`, or None when `text` names no user dataset (a registered task such as `gtsrb`)."""
    name, text = _unnamed(text)
    kind, colon, location = text.partition(":")
    if not colon or kind not in KINDS:
        return None
    options: dict[str, str] = {}
    path, question, query = location.rpartition("?")
    if question and query and all("=" in pair for pair in query.split("&")):
        options = dict(pair.split("=", 1) for pair in query.split("&"))
        location = path
    unknown = sorted(set(options) - set(allowed.get(kind, ())))
    if unknown:
        known = ", ".join(allowed.get(kind, ())) or "none"
        raise PatcherError(f"{kind}: dataset option {', '.join(unknown)} is unknown (options: {known})")
    if not location:
        raise PatcherError(f"{text!r} names no location: write {SPEC_HELP}")
    return Spec(kind, Path(location).expanduser().absolute(), name, options)


def task_name(spec: Spec, explicit: str | None, registered: Iterable[str]) -> str:
    """The task's short name: `explicit`, else the spec's NAME=, else the dataset's folder or file name."""
    chosen = explicit or spec.name
    if chosen is not None:
        if not NAME_PATTERN.fullmatch(chosen):
            raise PatcherError(f"task name {chosen!r} is not usable in model and tensor names: use a letter, then "
                               "letters, digits, '_' or '-' (at most 63)")
        if _normal(chosen) in registered:
            raise PatcherError(f"task name {chosen!r} is a built-in task's: choose another with --task-name")
        return chosen
    stem = spec.location.stem if spec.location.suffix == ".csv" else spec.location.name
    default = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")
    if not NAME_PATTERN.fullmatch(default) or _normal(default) in registered:
        reason = "is a built-in task's" if _normal(default) in registered else "is not usable in model names"
        raise PatcherError(f"the dataset's name {stem!r} {reason}: name the task with --task-name NAME "
                           f"(or NAME={spec.kind}:...)")
    return default


def class_names(labels: Iterable[str], folder: Path, what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(raw labels sorted, class names in that order): the labels read as names, or mapped by folder/classnames.txt.

    `what` says what a raw label is ("class folder", "label") in errors.
    """
    raw = tuple(sorted(set(labels)))
    mapping = read_class_map(folder / CLASS_MAP, what)
    if mapping is None:
        return raw, tuple(label.replace("_", " ") for label in raw)
    unnamed = [label for label in raw if label not in mapping]
    unused = [label for label in mapping if label not in set(raw)]
    if unnamed or unused:
        parts = ([f"names no {what} {_shown(unnamed)}"] if unnamed else []) + (
            [f"names {what}s the data lacks: {_shown(unused)}"] if unused else [])
        raise PatcherError(f"{folder / CLASS_MAP} {' and '.join(parts)}: give one `LABEL: NAME` line for each of "
                           f"{_shown(raw)}")
    names = tuple(mapping[label] for label in raw)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PatcherError(f"{folder / CLASS_MAP} gives the name {_shown(twice)} to several {what}s: one name each")
    return raw, names


def read_class_map(path: Path, what: str) -> dict[str, str] | None:
    """The `LABEL: NAME` lines of a class map, None when there is none; a list without labels is refused."""
    lines = read_lines(path)
    if not lines:
        return None
    mapping: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        label, colon, name = line.partition(":")
        if not colon or not label.strip() or not name.strip():
            raise PatcherError(f"{path} line {number} ({line!r}) is not `LABEL: NAME`: give each {what} its name "
                               "on one line, e.g. `n01: tabby cat` (a bare list of names could be paired in the wrong "
                               "order)")
        if label.strip() in mapping:
            raise PatcherError(f"{path} names {what} {label.strip()!r} twice: one line each")
        mapping[label.strip()] = name.strip()
    return mapping


def read_templates(folder: Path) -> tuple[str, ...]:
    """folder/templates.txt's prompt templates, or the default ("a photo of a {}.")."""
    return read_lines(folder / TEMPLATES) or templates.FOLDER_DEFAULT


def read_lines(path: Path) -> tuple[str, ...]:
    """The non-blank lines of a text file, stripped; empty when the file does not exist."""
    if not path.is_file():
        return ()
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _shown(items: list[str] | tuple[str, ...], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def named_spec(tasks: str, name: str | None, csv_options: dict[str, str]) -> str:
    """The --task value with --task-name and the --csv-* options written into the specs of the user's datasets."""
    specs = [text.strip() for text in tasks.split(",") if text.strip()]
    own = [index for index, text in enumerate(specs) if _unnamed(text)[1].partition(":")[0] in KINDS]
    if name is not None and len(own) != 1:
        raise PatcherError("--task-name names one dataset of your own (folder:DIR, csv:..., wds:DIR) in --task; "
                           "for several, write NAME=folder:DIR for each")
    changed = "&".join(f"{key}={value}" for key, value in csv_options.items() if value != CSV_DEFAULTS[key])
    for index in own:
        given, text = _unnamed(specs[index])
        if text.startswith("csv:") and changed and "?" not in text:
            text += f"?{changed}"
        chosen = name or given
        specs[index] = f"{chosen}={text}" if chosen else text
    return ",".join(specs)


def _normal(name: str) -> str:
    """A name as the registry compares it (case-insensitive, '_' read as '-')."""
    return name.lower().replace("_", "-")


def _unnamed(text: str) -> tuple[str | None, str]:
    """(NAME, the rest) of "NAME=KIND:...", (None, text) otherwise."""
    head, equals, rest = text.partition("=")
    if equals and NAME_PATTERN.fullmatch(head) and rest.partition(":")[0] in KINDS:
        return head, rest
    return None, text
