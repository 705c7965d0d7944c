"""A stage's output directory, written whole or not at all: the one way patcher writes a directory.

    with staged_output(out) as staging:                  # locked; what a killed writer left is cleaned first
        path = staging.open()                            # a hidden sibling, created when the stage first writes
        ...                                              # renamed into place when the block succeeds, removed
                                                         # when it fails; write faults become one error line

A resumable job passes `resume=Resume(fingerprint, resume)`: its staging directory is then the fixed hidden
sibling `.NAME.partial`, holding the options it was started with, and it is kept when the job is interrupted
(Ctrl-C, kill -9) so that the same command with `--resume` takes it up. Replacing an existing output renames it
to a hidden `.old-` sibling first; `clean_stale` puts it back when a writer died between the two renames, so the
output is always either the old or the new whole.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.faults import write_errors
from patcher.base.files import fsync_directory, fsync_tree, write_json
from patcher.base.locks import check_output_name, hidden_sibling, output_lock

FINGERPRINT = "options.json"  # in a resumable staging directory: the options it was started with
CHECKPOINTS = "checkpoints"  # in a resumable staging directory: removed when the job completes


@dataclass(frozen=True)
class Resume:
    """How a resumable job stages its output: the options that determine it, and whether to take up a staging."""

    fingerprint: dict[str, Any]
    resume: bool = False


def _siblings(final: Path, kind: str) -> list[Path]:
    if not final.parent.is_dir():
        return []
    prefix = hidden_sibling(final, f".{kind}-").name
    return [entry for entry in final.parent.iterdir() if entry.name.startswith(prefix)]


def clean_stale(final: Path) -> list[Path]:
    """Remove what a killed writer of `final` left beside it (`.partial-*`, `.old-*`); returns what was removed.

    Call it only while holding `output_lock(final)`. A missing `final` with an `.old-` sibling (killed between
    the two renames of a replacement) gets the old directory back.
    """
    final = Path(final)
    olds = sorted(_siblings(final, "old"), key=lambda path: path.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
    removed = [*_siblings(final, "partial"), *olds]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def resumable_path(final: Path) -> Path:
    """The fixed hidden sibling where a resumable job builds `final`, so that `--resume` can find it."""
    return hidden_sibling(final, ".partial")


def _check_resumable(staging: Path, fingerprint: dict[str, Any]) -> None:
    saved = staging / FINGERPRINT
    if not saved.is_file():
        raise PatcherError(f"nothing to resume at {staging}: run the same command without --resume")
    try:
        same = json.loads(saved.read_text()) == json.loads(json.dumps(fingerprint, default=str))
    except json.JSONDecodeError:
        same = False
    if not same:
        raise PatcherError(f"{staging} was started with other options: rerun with those or drop --resume")


@dataclass
class Staging:
    """The staging directory of one output, as `staged_output` hands it to the stage."""

    final: Path
    overwrite: bool = False
    resume: Resume | None = None
    writer: bool = True
    path: Path = field(init=False)
    opened: bool = False

    def __post_init__(self) -> None:
        self.path = (resumable_path(self.final) if self.resume is not None
                     else hidden_sibling(self.final, f".partial-{uuid.uuid4().hex[:8]}"))

    def open(self) -> Path:
        """Create the staging directory (or take up the interrupted one with --resume); the writer only."""
        if not self.writer or self.opened:
            return self.path
        with write_errors(self.final, self.path):
            if self.resume is not None and self.resume.resume:
                _check_resumable(self.path, self.resume.fingerprint)
            elif self.resume is not None:
                if self.path.exists():
                    shutil.rmtree(self.path)
                self.path.mkdir(parents=True)
                write_json(self.path / FINGERPRINT, json.loads(json.dumps(self.resume.fingerprint, default=str)))
            else:
                self.path.mkdir(parents=True)
        self.opened = True
        return self.path

    def discard(self) -> None:
        """Remove the staging directory (a failed job's)."""
        if self.opened:
            shutil.rmtree(self.path, ignore_errors=True)

    def publish(self) -> None:
        """Rename the finished staging directory into place (an existing output replaced only with overwrite)."""
        if not self.opened:
            return
        if self.resume is not None:
            (self.path / FINGERPRINT).unlink(missing_ok=True)
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
        if self.final.exists() and not self.overwrite:
            raise PatcherError(f"{self.final} appeared while this job ran: the result stays in {self.path}")
        fsync_tree(self.path)  # every file on the device before the rename makes the output look complete
        if self.final.exists():
            backup = hidden_sibling(self.final, f".old-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, backup)
            os.replace(self.path, self.final)
            fsync_directory(self.final.parent)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
            fsync_directory(self.final.parent)


def _refuse_existing(final: Path) -> None:
    if final.exists():
        raise PatcherError(f"{final} already exists: pass another --out or remove it")


@contextmanager
def staged_output(final: Path, overwrite: bool = False, resume: Resume | None = None,
                  writer: bool = True) -> Iterator[Staging]:
    """Guard a stage writing the directory `final` (see the module's docstring). `writer=False` (a torchrun rank
    other than 0) only checks and yields the staging's path; rank 0 does the writing."""
    final = Path(final)
    check_output_name(final)
    staging = Staging(final, overwrite, resume, writer)
    if not overwrite:
        _refuse_existing(final)
    if not writer:
        yield staging
        return
    with write_errors(final), output_lock(final):
        clean_stale(final)
        if not overwrite:
            _refuse_existing(final)
        if resume is not None and resume.resume:
            _check_resumable(staging.path, resume.fingerprint)
        try:
            with write_errors(final, staging.path):
                yield staging
        except KeyboardInterrupt:
            if resume is None:
                staging.discard()
            raise
        except BaseException:
            staging.discard()
            raise
        with write_errors(final, staging.path):
            staging.publish()
