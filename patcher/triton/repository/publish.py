"""All-or-nothing updates of a model repository: stage every model's new files, then publish them under a journal.

    <repo>/.patcher-staging-<id>/<model>/version/   the new version directory, complete before publishing starts
    <repo>/.patcher-staging-<id>/<model>/model/     the model's new config.pbtxt and labels files
    <repo>/.patcher-journal.json                    {"serial", "state": "publishing" | "committed", "models",
                                                     "hashes": the sha256 of every file published, ...}
    <repo>/.patcher-publish.lock                    held while publishing, and by `patcher serve` while it loads

Publishing is renames only. A writer killed while publishing leaves the journal at "publishing"; the next writer
finishes the same renames (roll forward), and `patcher serve` loads nothing from a repository in that state.
Staging folders of killed writers are removed by the next writer. Writers exclude each other with `output_lock`.
The journal's hashes are what `patcher serve` checks a model's files against before it loads them (`integrity.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.files import (
    fsync_directory,
    fsync_file,
    fsync_tree,
    now_iso,
    remove_atomic_leftovers,
    sha256_file,
    write_json,
)

DEFAULT_REPOSITORY = Path("runs/triton_models")  # local and git-ignored; triton_models/ is the committed example
JOURNAL = ".patcher-journal.json"
NEXT_JOURNAL = ".patcher-journal.next.json"
PUBLISH_LOCK = ".patcher-publish.lock"
STAGING_PREFIX = ".patcher-staging-"
JOURNAL_FORMAT = "patcher-repository-journal/1"
VERSION_DIR, MODEL_DIR = "version", "model"
PUBLISH_WAIT_S = 300.0


@dataclass(frozen=True, kw_only=True)
class Journal:
    """The repository's last transaction: its serial number, state and what it published."""

    serial: int = 0
    state: str = "committed"
    entry: str | None = None
    version: int | None = None
    models: dict[str, int | None] = field(default_factory=dict)  # model -> new version (None: config only)
    staging: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)  # every published file (`<model>/...`) -> sha256

    @property
    def publishing(self) -> bool:
        """True while (or when a killed writer left) a transaction half-published."""
        return self.state == "publishing"

    def record(self) -> dict[str, Any]:
        """The journal file's content."""
        return {"format": JOURNAL_FORMAT, "serial": self.serial, "state": self.state, "entry": self.entry,
                "version": self.version, "models": self.models, "staging": self.staging, "time": now_iso(),
                "pid": os.getpid(), "hashes": self.hashes}


def read_journal(repo: Path) -> Journal:
    """The repository's journal (an empty committed one when there is none)."""
    path = Path(repo) / JOURNAL
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Journal()
    except (OSError, ValueError) as error:
        raise PatcherError(f"cannot read {path} ({error}): remove it if no `patcher triton` is running") from None
    return journal_from(data)


def journal_from(data: dict[str, Any]) -> Journal:
    """A journal from its record (an empty committed one from an empty record)."""
    hashes = {str(k): str(v) for k, v in dict(data.get("hashes") or {}).items()}
    return Journal(serial=int(data.get("serial", 0)), state=str(data.get("state", "committed")),
                   entry=data.get("entry"), version=data.get("version"), models=dict(data.get("models") or {}),
                   staging=data.get("staging"), hashes=hashes)


def staged_hashes(staged: list[Staged]) -> dict[str, str]:
    """The sha256 of every staged file, by the path it is published at (`<model>/<version>/...`, `<model>/...`)."""
    hashes = {}
    for item in staged:
        folders = [(item.model_dir, item.model)]
        if item.version is not None:
            folders.append((item.version_dir, f"{item.model}/{item.version}"))
        for folder, prefix in folders:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                hashes[f"{prefix}/{path.relative_to(folder).as_posix()}"] = sha256_file(path)
    return hashes


@contextlib.contextmanager
def publish_lock(repo: Path, wait_s: float = PUBLISH_WAIT_S, blocking: bool = True) -> Iterator[bool]:
    """Hold the repository's publish lock; yields False (not held) if `blocking` is False and someone holds it."""
    path = Path(repo) / PUBLISH_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise PatcherError(f"{repo} is being loaded by `patcher serve` for more than {wait_s:.0f} s: "
                                       "try again, or stop the server") from None
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class Staged:
    """One model's staged update: new config/labels files, and a new version directory (or none)."""

    model: str
    version: int | None
    root: Path  # <staging>/<model>

    @property
    def version_dir(self) -> Path:
        """Where the new version's files are staged."""
        return self.root / VERSION_DIR

    @property
    def model_dir(self) -> Path:
        """Where the model's new config.pbtxt and labels are staged."""
        return self.root / MODEL_DIR


def new_staging(repo: Path) -> Path:
    """A fresh staging folder in the repository (hidden: Triton and `patcher serve` ignore it)."""
    path = Path(repo) / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def stage_model(staging: Path, model: str, version: int | None) -> Staged:
    """Make the folders one model's update is staged in."""
    staged = Staged(model, version, staging / model)
    staged.model_dir.mkdir(parents=True)
    if version is not None:
        staged.version_dir.mkdir()
    return staged


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _changed(repo: Path, staging: Path, staged: list[Staged]) -> bool:
    """True when publishing would change anything: a new version, or a config or labels file that differs."""
    for item in staged:
        if item.version is not None:
            return True
        staged_files = staging / item.model / MODEL_DIR
        files = sorted(p for p in staged_files.rglob("*") if p.is_file())
        if any(not _same_file(path, repo / item.model / path.relative_to(staged_files)) for path in files):
            return True
    return False


def _publish_model(repo: Path, staging: Path, model: str, version: int | None) -> None:
    """Move one staged model into place; repeating it after an interruption finishes what is left. A file equal to
    the one in place is left alone, so its modification time tells `patcher serve` the model did not change."""
    source, target = staging / model, repo / model
    if not target.is_dir():
        target.mkdir()
        fsync_directory(repo)
    if (source / MODEL_DIR).is_dir():
        for path in sorted(p for p in (source / MODEL_DIR).rglob("*") if p.is_file()):  # warmup/ files too
            destination = target / path.relative_to(source / MODEL_DIR)
            if not destination.parent.is_dir():
                destination.parent.mkdir()
                fsync_directory(destination.parent.parent)
            if not _same_file(path, destination):
                os.replace(path, destination)
                fsync_directory(destination.parent)
    if version is not None and (source / VERSION_DIR).is_dir():
        final = target / str(version)
        if final.exists():
            raise PatcherError(f"{final} exists although {repo / JOURNAL} is publishing it: remove the staging "
                               f"folder {staging} by hand")
        os.replace(source / VERSION_DIR, final)
        fsync_directory(target)


def _finish(repo: Path, journal: Journal) -> None:
    staging = repo / (journal.staging or "")
    for model, version in journal.models.items():
        _publish_model(repo, staging, model, version)
    committed = dataclasses.replace(journal, state="committed")
    write_json(repo / JOURNAL, committed.record())


def publish(repo: Path, staging: Path, staged: list[Staged], entry: str, version: int | None) -> Journal:
    """Publish staged models all together: journal "publishing", renames, journal "committed" (a rename); nothing
    (the journal as it was) when every staged file equals the one in place.

    Call it holding `output_lock(repo)`; it takes the publish lock, so a serving watcher never sees half of it.
    """
    repo = Path(repo)
    with publish_lock(repo):
        previous = read_journal(repo)
        if not _changed(repo, staging, staged):  # the same export again: no transaction, no reload anywhere
            shutil.rmtree(staging, ignore_errors=True)
            return previous
        models = {s.model: s.version for s in staged}
        hashes = {**previous.hashes, **staged_hashes(staged)}
        journal = Journal(serial=previous.serial + 1, state="publishing", entry=entry, version=version, models=models,
                          staging=staging.name, hashes=hashes)
        committed = dataclasses.replace(journal, state="committed")
        fsync_tree(staging)  # every staged file on the device before the first rename publishes it
        write_json(repo / NEXT_JOURNAL, committed.record())  # written now: committing needs no free space
        write_json(repo / JOURNAL, journal.record())
        for item in staged:
            _publish_model(repo, staging, item.model, item.version)
        fsync_file(repo / NEXT_JOURNAL)  # flushed when written; flushed again under its own name, to be plain
        os.replace(repo / NEXT_JOURNAL, repo / JOURNAL)
        fsync_directory(repo)
    shutil.rmtree(staging, ignore_errors=True)
    return committed


def recover(repo: Path) -> list[str]:
    """Finish a transaction a killed writer left publishing, and remove stale staging; what was done, in words.

    Call it holding `output_lock(repo)`.
    """
    repo = Path(repo)
    done = []
    journal = read_journal(repo)
    if journal.publishing:
        with publish_lock(repo):
            _finish(repo, journal)
        done.append(f"finished publishing version {journal.version} of {journal.entry} (interrupted earlier)")
    (repo / NEXT_JOURNAL).unlink(missing_ok=True)
    for path in remove_atomic_leftovers(repo):
        done.append(f"removed {path.name} (a journal write an interrupted run left)")
    for path in sorted(repo.glob(f"{STAGING_PREFIX}*")):
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name} (left by an interrupted run)")
    return done
