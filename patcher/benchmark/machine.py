"""The machine a benchmark ran on: CPU, cores, memory, load, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from patcher.base.versions import library_versions


def _cpuinfo() -> tuple[str, int | None]:
    """CPU model name and physical core count from /proc/cpuinfo (None where it does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, cores, physical = "", set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return model or platform.processor() or platform.machine(), len(cores) or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on a shared machine shows here)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, logical and physical cores, usable cores, memory, OS, load and library versions."""
    model, physical = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "versions": library_versions(),
    }


def cpu_seconds_self() -> float:
    """CPU time (user + system) this process has used so far, all threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds_group(pgid: int) -> float | None:
    """CPU time used so far by the live processes of a process group (a server and its backend stubs), from /proc."""
    from patcher.triton.serving.processes import group_process_stats

    stats = group_process_stats(pgid)
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in stats.values())
    return ticks / os.sysconf("SC_CLK_TCK") if stats else None
