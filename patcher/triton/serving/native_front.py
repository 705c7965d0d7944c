"""The compiled gRPC front (native_front/main.go): front.py's pass-through in Go, built once with the system's Go and
grpc-go (Debian: golang-go, golang-google-grpc-dev) into the cache, and run as a child of `patcher serve`.

It keeps the Python front's guarantees (no deadline or cancellation reaches tritonserver, messages over the limit
refused unread, a budget of bytes in flight, idle connections closed) for less a request: on the 2-core AMD EPYC it
kept 0.71 of direct throughput on the tiny model at batch 1 and 0.88 at batch 8, where the Python front kept 0.53
and 0.78 (bench/results/serving-front.md).
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from patcher.base.cache import cache_dir
from patcher.base.errors import PatcherError
from patcher.triton.serving.front import MAX_INFLIGHT_BYTES, MAX_MESSAGE_BYTES, WAIT_S, WORKERS
from patcher.triton.serving.processes import die_with_parent

SOURCE = Path(__file__).parent / "native_front" / "main.go"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-google-grpc-dev puts grpc-go's sources
INSTALL_HINT = "apt-get install golang-go golang-google-grpc-dev"
BUILD_TIMEOUT_S = 300
START_TIMEOUT_S = 10.0
GRACE_S = 2.0  # what calls under way get at a stop


class FrontUnavailable(PatcherError):
    """The compiled front cannot be built here; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the compiled gRPC front cannot be built: {reason}; or serve with --grpc-front python")
        self.reason = reason


def _go_environment() -> dict[str, str]:
    return {**os.environ, "GOPATH": os.environ.get("PATCHER_GOPATH", str(GOPATH)), "GO111MODULE": "off",
            "GOFLAGS": ""}


def native_front_missing() -> str | None:
    """Why the compiled front cannot be built here (None: it can)."""
    if not SOURCE.is_file():
        return f"its source {SOURCE} is not installed"
    if shutil.which("go") is None:
        return f"no Go toolchain on PATH ({INSTALL_HINT})"
    gopath = Path(_go_environment()["GOPATH"])
    if not (gopath / "src" / "google.golang.org" / "grpc").is_dir():
        return f"grpc-go is not under {gopath}/src ({INSTALL_HINT})"
    return None


def native_front_binary() -> Path:
    """The built front for this source and Go, built into the cache on first use (atomically: concurrent builds are
    safe); FrontUnavailable if it cannot be built."""
    missing = native_front_missing()
    if missing:
        raise FrontUnavailable(missing)
    version = subprocess.run(["go", "version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = cache_dir("bin") / f"patcher-grpc-front-{digest}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f".{binary.name}.{os.getpid()}")
    try:
        built = subprocess.run(["go", "build", "-o", str(partial), SOURCE.name], cwd=SOURCE.parent,
                               env=_go_environment(), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                               check=False)
        failure = None if built.returncode == 0 else " | ".join(built.stderr.strip().splitlines()[-3:])
    except subprocess.TimeoutExpired:
        failure = f"go build took more than {BUILD_TIMEOUT_S} s"
    try:
        if failure is not None:
            raise FrontUnavailable(f"it did not build: {failure}")
        os.replace(partial, binary)
    finally:
        partial.unlink(missing_ok=True)
    return binary


class NativeGrpcFront:
    """The compiled pass-through on `host:port` to tritonserver's gRPC at `upstream`, as a child process."""

    def __init__(self, host: str, port: int, upstream: str, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 budget_bytes: int = MAX_INFLIGHT_BYTES, binary: Path | None = None) -> None:
        self.address, self.upstream = f"{host}:{port}", upstream
        self.max_message_bytes, self.budget_bytes = max_message_bytes, budget_bytes
        self.binary = binary
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> NativeGrpcFront:
        """Build if needed, start and wait until it listens; PatcherError if the port cannot be bound."""
        binary = self.binary or native_front_binary()
        command = [str(binary), "-listen", self.address, "-upstream", self.upstream,
                   "-max-message-bytes", str(self.max_message_bytes), "-budget-bytes", str(self.budget_bytes),
                   "-wait-s", str(WAIT_S), "-workers", str(WORKERS), "-grace-s", str(GRACE_S)]
        # one thread runs Go code unless GOMAXPROCS says otherwise: the front's work is a small share of a request,
        # and on 2 shared cores a second one idling for work cost throughput (0.74 against 0.84 of direct)
        environment = {"GOMAXPROCS": "1", **os.environ}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=environment, preexec_fn=die_with_parent)
        assert process.stdout is not None and process.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready and process.stdout.readline().startswith("listening"):
                self.process = process
                threading.Thread(target=_pass_on, args=(process,), daemon=True).start()
                return self
            if process.poll() is not None:
                error = process.stderr.read().strip().splitlines()
                raise PatcherError((error[-1] if error else f"the compiled gRPC front exited ({process.returncode})")
                                   .removeprefix("error: "))
        process.kill()
        process.wait()
        raise PatcherError(f"the compiled gRPC front did not listen on {self.address} within {START_TIMEOUT_S:.0f} s")

    def trim(self) -> None:
        """Nothing to do: the front gives back the memory of large requests itself, once a second."""

    def stop(self) -> None:
        """Stop listening; requests in flight get GRACE_S to finish."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None


def _pass_on(process: subprocess.Popen[str]) -> None:
    """The running front's own messages (grpc-go's errors) onto this process's stderr, named."""
    assert process.stderr is not None
    for line in process.stderr:
        print(f"gRPC front: {line.rstrip()}", file=sys.stderr, flush=True)
