"""What `patcher tasks` shows: every registered task with its classes, whether its data is here, its suites."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.data.tasks.paths import resolve_data_root
from patcher.data.tasks.registry import TASKS, get_task, known_tasks
from patcher.data.tasks.rendered.catalog import RENDERED_TASKS
from patcher.data.tasks.suites import suites_of

ALWAYS_HERE = {"digits", "printed-digits", "typographic-digits", *RENDERED_TASKS} - {"fashion-sketch"}
DATA_OF = {"fashion-sketch": "fashion-mnist"}  # a task drawn from another task's images


@dataclass(frozen=True)
class TaskListing:
    """One row of `patcher tasks`."""

    name: str
    classes: int
    classnames: tuple[str, ...]
    data_here: bool
    suites: tuple[str, ...]
    summary: str = ""
    reference: str = ""


def data_here(name: str, data_root: Path | None = None) -> bool:
    """Whether the task's test images can be read without a download (rendered and bundled tasks always can)."""
    if name in ALWAYS_HERE:
        return True
    try:
        get_task(DATA_OF.get(name, name)).load("test", resolve_data_root(data_root), False)
    except (PatcherError, OSError, RuntimeError):
        return False
    return True


def list_tasks(suite: str | None = None, data_root: Path | None = None) -> list[TaskListing]:
    """Every registered task (or one suite's), in name order."""
    rows = []
    for name in known_tasks():
        suites = tuple(suites_of(name))
        if suite is not None and suite not in suites:
            continue
        task = get_task(name)
        rows.append(TaskListing(name=name, classes=len(task.classnames), classnames=task.classnames,
                                data_here=data_here(name, data_root), suites=suites, summary=TASKS[name].summary,
                                reference=TASKS[name].reference))
    return rows
