"""`pytest --cpu-report FILE`: the CPU seconds each test costs, its own process's and its reaped children's.

The suite is CPU-bound on two cores (a run keeps them about 83% busy at -n 2), so wall-clock durations mislead: a
test that sleeps or waits for a server overlaps with the other worker's work, a test that builds or serves does not.
Each process (every xdist worker) appends one line per test to FILE (test id, own CPU, children's CPU, wall seconds);
the run's summary lists the costliest. Children count once reaped: a module fixture's server at the test that tears
it down; CLI runs forked by the per-worker zygote (faults_support.run_patcher) are reaped by the zygote, not counted.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHOWN = 15


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-report", metavar="FILE", default=None,
                     help="append each test's CPU seconds (own, reaped children's, wall) to FILE; summary shows the "
                          f"{SHOWN} costliest")


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its reaped children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    report = item.config.getoption("--cpu-report")
    own, children = cpu_seconds()
    started = time.monotonic()
    yield
    if report:
        own_after, children_after = cpu_seconds()
        line = (f"{item.nodeid}\t{own_after - own:.2f}\t{children_after - children:.2f}\t"
                f"{time.monotonic() - started:.2f}\n")
        with open(report, "a", encoding="utf-8") as out:  # one short append per test: whole lines from any worker
            out.write(line)


def read_report(path: Path) -> list[tuple[str, float, float, float]]:
    """The report's rows (test id, own CPU, children's CPU, wall), costliest first."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        test, own, children, wall = line.rsplit("\t", 3)
        rows.append((test, float(own), float(children), float(wall)))
    return sorted(rows, key=lambda row: -(row[1] + row[2]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report = config.getoption("--cpu-report")
    if not report or hasattr(config, "workerinput") or not Path(report).is_file():  # xdist workers: no
        return
    rows = read_report(Path(report))
    total = sum(own + children for _, own, children, _ in rows)
    terminalreporter.section(f"CPU seconds: {total:.0f} in {len(rows)} tests (own + reaped children; {report})")
    for test, own, children, wall in rows[:SHOWN]:
        terminalreporter.write_line(f"{own + children:7.1f} cpu  {own:6.1f} own  {children:6.1f} children  "
                                    f"{wall:6.1f} s wall  {test}")
