"""Whether `patcher export` has work to do, decided before any heavy import: the export already at --out is this
one (nothing to do), another one it may not replace (one error line, at once), or nothing yet. Imports no torch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.export.contract import EXPORT_FORMAT, EXPORT_JSON, ContentOptions, ExportRecord, read_export_record
from patcher.runs.layout import EXPORT_DIR
from patcher.runs.manifest import Run, load_run

IMAGES_PER_TASK = 256  # held-out images per task the parity check runs on, by default


def select_tasks(run: Run, tasks: list[str] | None) -> list[str]:
    """The tasks to export, in the run's order unless given; PatcherError for a task the run lacks."""
    if tasks is None:
        return run.tasks
    chosen = list(dict.fromkeys(tasks))
    if not chosen:
        raise PatcherError("no tasks given: pass task names the run has, or none for all of them")
    unknown = [task for task in chosen if task not in run.tasks]
    if unknown:
        raise PatcherError(f"run {run.name} has no task {', '.join(unknown)}: it has {', '.join(run.tasks)}")
    return chosen


def existing_export(out: Path, run: Run, content: ContentOptions, overwrite: bool, ignored: tuple[str, ...] = ()
                    ) -> bool:
    """True when `out` already holds this export; PatcherError when it holds something it may not replace."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise PatcherError(f"{out} is a file, not a directory: pass another --out")
    if not (out / EXPORT_JSON).is_file():
        if any(out.iterdir()):
            raise PatcherError(f"{out} exists and is not a patcher export: refusing to replace it, pass another --out")
        return False
    try:
        record: ExportRecord | None = read_export_record(out / EXPORT_JSON)
    except PatcherError:
        record = None
    difference = _difference(record, run, content, ignored)
    if difference is None and record is not None and _files_intact(out, record) and not overwrite:
        return True
    if overwrite:
        return False
    raise PatcherError(f"{out} holds a different export ({difference or 'files changed since'}): "
                       "pass --overwrite to replace it or another --out")


def _difference(record: ExportRecord | None, run: Run, content: ContentOptions, ignored: tuple[str, ...] = ()
                ) -> str | None:
    if record is None:
        return f"not a readable {EXPORT_FORMAT} record"
    if record.run.manifest_sha256 != run.manifest_sha256:
        return f"of run {record.run.name!r} with another manifest"
    previous, wanted = vars(record.options), vars(content)
    changed = [f"{key} {previous[key]!r} -> {value!r}" for key, value in wanted.items()
               if previous[key] != value and key not in ignored]
    return ", ".join(changed) or None


def _files_intact(out: Path, record: ExportRecord) -> bool:
    return all((out / entry.file).is_file() and sha256_file(out / entry.file) == entry.sha256
               for entry in record.models.values())


def check_target(run_path: Path, out: Path | None, content: ContentOptions, overwrite: bool,
                 ignored: tuple[str, ...] = ()) -> None:
    """PatcherError now when --out holds another export that --overwrite does not allow replacing (`content.tasks`
    empty: all of the run's)."""
    run = load_run(run_path)
    content = dataclasses.replace(content, tasks=select_tasks(run, content.tasks or None))
    existing_export(Path(out) if out is not None else run.path / EXPORT_DIR, run, content, overwrite, ignored)
