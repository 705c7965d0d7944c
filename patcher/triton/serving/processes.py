"""The server's processes, read from /proc: its process group, and the python-backend stub of each model."""

from __future__ import annotations

import contextlib
import ctypes
import signal
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
PR_SET_PDEATHSIG = 1


def group_process_stats(pgid: int) -> dict[int, list[str]]:
    """/proc/<pid>/stat fields (after the command name) of every process in a process group."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            stats[int(entry.name)] = fields
    return stats


def group_pids(pgid: int) -> list[int]:
    """Live processes in a process group (zombies excluded)."""
    return [pid for pid, fields in group_process_stats(pgid).items() if fields[0] != "Z"]


@dataclass(frozen=True)
class Stub:
    """One python-backend stub process: the model (directory name) and version it runs, its instance name."""

    pid: int
    model: str
    version: str
    instance: str


def stub_processes(pgid: int) -> list[Stub]:
    """The live python-backend stubs of the server whose process group is `pgid`.

    A stub's command line is `<stub> <repo>/<model>/<version>/model.py <shm region> ... <instance name> ...`.
    """
    stubs = []
    for pid in group_pids(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) < 9 or not argv[0].endswith(STUB_BINARY.encode()):
            continue
        script = Path(argv[1].decode(errors="replace"))
        stubs.append(Stub(pid, script.parent.parent.name, script.parent.name, argv[8].decode(errors="replace")))
    return stubs


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux), so no server is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
