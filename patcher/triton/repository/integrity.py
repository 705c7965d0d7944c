"""A model's files checked against the publish journal's hashes before anything loads them.

`patcher triton` records the sha256 of every file it publishes in the repository's journal (`publish.py`); before
`patcher serve` starts, rolls out, heals or restarts a model, it hashes the files that load would read (model-level
files and the version served) and refuses the model if one differs, is missing, or was never published: a file put
over `digits_classify/1/model.onnx` in a folder or an object store is named, not served. A repository whose journal
records no hashes (written by hand, or before patcher recorded them) is served unchecked, with a warning.
"""

from __future__ import annotations

import re

from patcher.base.errors import PatcherError
from patcher.triton.repository.configs import CONFIG_FILE
from patcher.triton.repository.publish import Journal
from patcher.triton.repository.stores import Store

COMPOSING = re.compile(r'model_name:\s*"([^"]+)"')


def integrity_problems(store: Store, model: str, journal: Journal) -> list[str]:
    """Why `model`'s files are not what `patcher triton` published (empty when they are, or nothing was recorded)."""
    if not journal.hashes:
        return []
    served = store.served_files(model)
    recorded = {path: digest for path, digest in journal.hashes.items() if path.startswith(f"{model}/")}
    versions = sorted({int(path.split("/")[1]) for path in served if path.split("/")[1].isdigit()})
    problems = []
    for path, digest in sorted(served.items()):
        if path not in recorded:
            problems.append(f"{store.location}/{path} was not published by `patcher triton`")
        elif recorded[path] != digest:
            problems.append(f"{store.location}/{path} differs from what `patcher triton` published (sha256 "
                            f"{digest[:12]}, the journal records {recorded[path][:12]})")
    for path in sorted(recorded):
        parts = path.split("/")
        in_version = parts[1].isdigit()
        if path not in served and (not in_version or (versions and int(parts[1]) == versions[-1])):
            problems.append(f"{store.location}/{path} is missing (the journal records it)")
    return problems


def with_composing(store: Store, models: list[str]) -> list[str]:
    """`models` and the models their ensembles use (loading an ensemble loads those from the repository too)."""
    found = list(models)
    for model in models:
        for used in COMPOSING.findall(store.read(f"{model}/{CONFIG_FILE}") or ""):
            if used not in found:
                found.append(used)
    return found


def check_integrity(store: Store, models: list[str]) -> None:
    """PatcherError (one line naming the first file) if any of `models`, or a model an ensemble of them uses,
    differs from what was published."""
    journal = store.journal()
    for model in with_composing(store, models):
        problems = integrity_problems(store, model, journal)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PatcherError(f"refusing to load {model}: {problems[0]}{more}: the repository was changed after "
                               "publishing; write it again with `patcher triton`")
