"""A tritonserver that is alive but not serving: stopped (SIGSTOP, a debugger) or hung (its HTTP health endpoint does
not answer). `patcher serve` runs a `Watchdog` in its own thread (its other calls to tritonserver would hang with
it): when `check()` gives a reason, the watchdog kills the server's process group with SIGKILL and keeps the reason,
and `patcher serve`'s loop, seeing the server dead, starts it again and names that reason.

A stopped process is recognised from /proc (state T or t) after STOPPED_S; anything else only after the health
endpoint has failed to answer within PROBE_S for HUNG_S in a row, so that a loaded machine's slow answer is not
mistaken for a hang. Either way the server is replaced within 30 s of the fault.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

STOPPED_S = 5.0
HUNG_S = 15.0
PROBE_S = 2.0


def process_state(pid: int) -> str | None:
    """A process's state letter from /proc (R, S, D, T, t, Z, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def answers_health(host: str, port: int, timeout_s: float = PROBE_S) -> bool:
    """True if tritonserver's HTTP endpoint answers /v2/health/live with 200 within `timeout_s`."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class Watchdog:
    """Whether the server with process `pid` and private HTTP port (host, port) should be replaced, and why."""

    def __init__(self, host: str, port: int, stopped_s: float = STOPPED_S, hung_s: float = HUNG_S) -> None:
        self.address = (host, port)
        self.stopped_s, self.hung_s = stopped_s, hung_s
        self.stopped_since: float | None = None
        self.silent_since: float | None = None
        self.reason: str | None = None  # why the watchdog killed the server, until taken
        self.paused = False  # while a server starts (not answering yet is no hang)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, pid: int) -> str | None:
        """The reason to replace the server, or None while it serves (or has not been bad for long enough)."""
        now = time.monotonic()
        if process_state(pid) in ("T", "t"):
            self.stopped_since = self.stopped_since or now
            if now - self.stopped_since >= self.stopped_s:
                return (f"tritonserver (pid {pid}) has been stopped for {now - self.stopped_since:.0f} s "
                        "(process state T: SIGSTOP or a debugger)")
            return None
        self.stopped_since = None
        if answers_health(*self.address):
            self.silent_since = None
            return None
        self.silent_since = self.silent_since or now
        if now - self.silent_since >= self.hung_s:
            return (f"tritonserver (pid {pid}) has not answered its health check (/v2/health/live within "
                    f"{PROBE_S:.0f} s) for {now - self.silent_since:.0f} s: hung")
        return None

    def watch(self, pgid: Callable[[], int | None], every_s: float = 1.0) -> Watchdog:
        """Check the server whose process group `pgid()` gives (None: not running) every `every_s` in a thread;
        kill it with SIGKILL on a reason."""
        def run() -> None:
            while not self._stop.wait(every_s):
                pid = pgid()
                if pid is None or self.reason is not None or self.paused:
                    continue
                reason = self.check(pid)
                if reason is not None:
                    self.reason = reason
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)

        self._thread = threading.Thread(target=run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def take_reason(self) -> str | None:
        """The reason the server was killed (None: it died on its own), forgetting what was seen; watching pauses
        until `resume`."""
        self.paused = True
        reason = self.reason
        self.stopped_since = self.silent_since = None
        self.reason = None
        return reason

    def resume(self) -> None:
        """Watch again (the new server is serving)."""
        self.stopped_since = self.silent_since = None
        self.paused = False

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
