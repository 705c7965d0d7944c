"""`patcher serve`: a server on a repository behind its gRPC and HTTP fronts, its key in a 0600 file, rolled out,
healed and restarted until stopped.

The ports are bound first (the fronts' gRPC and HTTP ports, then tritonserver's metrics port; tritonserver's own gRPC
and HTTP ports are private, on 127.0.0.1); the key file is written
only once they are this server's, so a second `patcher serve` refused for a taken port never touches the first's
key file. SIGINT or SIGTERM stops it at any phase, start-up included. A tritonserver that dies, or that the watchdog
finds stopped or hung (`watchdog.py`), is started again on the same ports with the same key and models, after a
back-off that doubles with each restart (none for the first, at most BACKOFF_MAX_S), the reason named (its signal,
and the log's last error line only if there is one); one replaced RESTARTS_PER_WINDOW times within RESTART_WINDOW_S
is given up, with its log named. A tritonserver killed by a signal while starting, or stopped by a python stub that
missed its health check while warming up, is started again (STARTUP_TRIES).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from patcher.base.errors import PatcherError
from patcher.triton.repository.entry import check_repository_path
from patcher.triton.repository.publish import publish_lock
from patcher.triton.repository.stores import is_object_store
from patcher.triton.serving.access import (
    RESTRICTED,
    default_key_file,
    live_owner,
    new_key,
    remove_key_file,
    write_key_file,
)
from patcher.triton.serving.front import MAX_INFLIGHT_BYTES, ByteBudget, GrpcFront, message_limit
from patcher.triton.serving.health import backend_died
from patcher.triton.serving.http_front import HttpFront
from patcher.triton.serving.native_front import FrontUnavailable, NativeGrpcFront, native_front_binary
from patcher.triton.serving.ports import free_port, port_in_use
from patcher.triton.serving.server import ServerDied, ServerPorts, ServerSettings, TritonServer, exit_reason
from patcher.triton.serving.supervisor import Supervisor
from patcher.triton.serving.watchdog import Watchdog

TICK_S = 1.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRPC_FRONTS = ("auto", "native", "python")
PRIVATE = "127.0.0.1"  # tritonserver's own gRPC and HTTP ports, reached by the fronts and the supervisor only
RESTARTS_PER_WINDOW = 8
RESTART_WINDOW_S = 300.0
BACKOFF_MAX_S = 30.0
STARTUP_TRIES = 3
Echo = Callable[[str], None]


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived before the server was up: unwind the start-up, cleaning as it goes."""


class _Signals:
    """SIGINT/SIGTERM: raise Stopped while starting (so a start-up that waits is cut short), set `stop` after."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.serving = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        if not self.serving:
            raise Stopped(signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _check_ports(host: str, ports: dict[str, int]) -> None:
    for kind, port in ports.items():
        if port_in_use(host, port):
            raise PatcherError(f"{kind} port {host}:{port} is in use (another server?): choose another port")


def _announce(server: TritonServer, urls: dict[str, str], key_path: Path | None, host: str, front: str,
              echo: Echo) -> None:
    echo(f"tritonserver ready in {server.timings['start_s']:.1f} s: repository {server.repo}")
    echo(f"  gRPC    {urls['grpc']} (a {front} front that never passes a client's deadline or cancellation to "
         "tritonserver)")
    echo(f"  HTTP    {urls['http']} (a front that refuses a body over the request bound unread)")
    echo(f"  metrics {server.metrics_url}")
    echo(f"  models  {', '.join(server.loaded)}")
    echo(f"  key     {key_path} (0600; {', '.join(RESTRICTED)} need it)")
    echo(f"  log     {server.log_path}")
    if not server.store.journal().hashes:
        echo("  note    the repository's journal records no file hashes: its files are served unchecked "
             "(written by hand, or by an older patcher; `patcher triton` records them)")
    if host not in LOOPBACK:
        echo(f"  note    inference, health and metadata are open to anyone who reaches {host}; "
             "loading models and the other control APIs need the key")
    echo("Ctrl-C stops it.")


def _restart(server: TritonServer, supervisor: Supervisor, history: list[float], reason: str | None,
             stop: threading.Event) -> None:
    """Replace a dead (or, with `reason`, a stopped or hung) tritonserver, after a back-off that doubles with each
    restart in RESTART_WINDOW_S; PatcherError once it has been replaced too often."""
    if reason is not None and server.pgid is not None:  # stopped or hung: SIGKILL reaches a stopped process too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pgid, signal.SIGKILL)
        if server.process is not None:
            server.process.wait(timeout=30)
    code = server.process.returncode if server.process is not None else None
    failure = server.failure(reason or f"tritonserver exited unexpectedly ({exit_reason(code)})", errors_only=True)
    now = time.monotonic()
    history[:] = [t for t in history if now - t < RESTART_WINDOW_S] + [now]
    if len(history) > RESTARTS_PER_WINDOW:
        raise PatcherError(f"{failure}; replaced {len(history) - 1} times in {RESTART_WINDOW_S:.0f} s: not again")
    delay = backoff_s(len(history))
    supervisor.log(f"{failure}; restarting it on the same ports with the same key"
                   + (f" in {delay:.0f} s (restart {len(history)} in {RESTART_WINDOW_S:.0f} s)" if delay else ""))
    if stop.wait(delay):
        return
    started = time.perf_counter()
    # loads only what a writer has finished publishing (an object store has no lock: its journal's state tells)
    with publish_lock(server.repo) if isinstance(server.repo, Path) else contextlib.nullcontext():
        server.restart()
        supervisor.restarted()
    supervisor.log(f"tritonserver serving again ({time.perf_counter() - started:.1f} s, restart {server.restarts}; "
                   f"log {server.log_path})")


def backoff_s(restarts: int) -> float:
    """Seconds to wait before the n-th restart within the window: none for the first, then 1, 2, 4, ... up to
    BACKOFF_MAX_S."""
    return 0.0 if restarts <= 1 else min(BACKOFF_MAX_S, 2.0 ** (restarts - 2))


def _start(server: TritonServer, echo: Echo) -> None:
    """Start tritonserver; one killed by a signal while starting (e.g. SIGABRT from a race in its epoll loop on a
    loaded machine), or one that exited because a python stub missed its health check, is started again, up to
    STARTUP_TRIES times. A model that fails to load is not retried."""
    for attempt in range(1, STARTUP_TRIES + 1):
        try:
            server.start()
            return
        except ServerDied as died:
            # python_backend's stub marks itself healthy every 300 ms and the server gives it 1 s: a stub starved that
            # long on a saturated machine fails the model's warmup with "Stub process '<model>' is not healthy."
            if not ("(signal " in str(died) or backend_died(str(died))) or attempt == STARTUP_TRIES:
                raise
            echo(f"{died}; starting it again (try {attempt + 1} of {STARTUP_TRIES})")
            time.sleep(backoff_s(attempt + 1))


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """What `patcher serve` serves and where: the models (None: all, and new ones as they are published), the public
    address and ports, tritonserver's log, its start-up timeout, the key file (default: under the cache), and how
    often the loop looks at the server."""

    models: list[str] | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_path: Path | None = None
    startup_timeout_s: float = 120
    key_file: Path | None = None
    tick_s: float = TICK_S
    grpc_front: str = "auto"  # GRPC_FRONTS


def serve_forever(repo: Path | str, options: ServeOptions | None = None,
                  echo: Echo = functools.partial(print, flush=True)) -> None:
    """Start a server, write its key file, print its endpoints; roll out, heal and restart until SIGINT/SIGTERM."""
    options = options or ServeOptions()
    if not is_object_store(repo):
        check_repository_path(Path(repo))
    signals = _Signals()
    host = options.host
    grpc_url, http_url = f"{host}:{options.grpc_port}", f"http://{host}:{options.http_port}"
    fronts: list[GrpcFront | NativeGrpcFront | HttpFront] = []
    key = new_key()
    ports = ServerPorts(host=host, private_host=PRIVATE, http=free_port(PRIVATE), grpc=free_port(PRIVATE),
                        metrics=options.metrics_port)
    settings = ServerSettings(log_path=options.log_path, startup_timeout_s=options.startup_timeout_s)
    server = TritonServer(repo, models=options.models, ports=ports, settings=settings, key=key)
    key_path = options.key_file or default_key_file(grpc_url)
    watchdog: Watchdog | None = None
    try:
        _check_ports(host, {"http": options.http_port, "gRPC": options.grpc_port, "metrics": options.metrics_port})
        owner = live_owner(key_path)
        if owner is not None:
            raise PatcherError(f"{key_path} is the key file of the running server {owner}: choose another --key-file")
        grpc_front = _open_fronts(server, options, fronts, echo)
        _start(server, echo)
        endpoints = {"grpc": grpc_url, "http": http_url, "repository": str(server.repo)}
        key = write_key_file(key, key_path, endpoints)  # only now: the ports are this server's
        _announce(server, endpoints, key.path, host,
                  "compiled" if isinstance(grpc_front, NativeGrpcFront) else "Python", echo)
        supervisor = Supervisor(server, serve_all=options.models is None, echo=echo)
        watchdog = Watchdog(PRIVATE, int(server.ports["http"] or 0)).watch(
            lambda: server.pgid if server.running() else None)
        _serve(server, supervisor, watchdog, signals, grpc_front, options.tick_s)
    except Stopped as stopped:
        echo(f"{stopped} during start-up: stopping")
    finally:
        signals.serving = True  # a second signal while cleaning up must not cut the cleaning short
        if watchdog is not None:
            watchdog.stop()
        server.stop()
        for front in fronts:
            front.stop()
        remove_key_file(key)
        signals.restore()
    echo(f"tritonserver stopped in {server.timings.get('stop_s', 0):.1f} s")


def _open_fronts(server: TritonServer, options: ServeOptions, fronts: list[GrpcFront | NativeGrpcFront | HttpFront],
                 echo: Echo) -> GrpcFront | NativeGrpcFront:
    """The public gRPC and HTTP fronts, started and added to `fronts` one by one (so a failure stops those up);
    the gRPC front: the compiled one where it can be built (or is asked for), else the Python one."""
    if options.grpc_front not in GRPC_FRONTS:
        raise PatcherError(f"--grpc-front {options.grpc_front!r}: choose one of {', '.join(GRPC_FRONTS)}")
    limit = message_limit(server.repo, options.models)
    binary, missing = None, None
    if options.grpc_front != "python":
        try:
            binary = native_front_binary()
        except FrontUnavailable as error:
            if options.grpc_front == "native":
                raise
            missing = error.reason
    grpc_front: GrpcFront | NativeGrpcFront
    if binary is None:
        budget = ByteBudget(MAX_INFLIGHT_BYTES)  # one budget, both fronts
        grpc_front = GrpcFront(options.host, options.grpc_port, server.grpc_url, limit, budget)
        if missing:
            echo(f"gRPC front: the Python one ({missing})")
    else:  # a process of its own: the bytes in flight are split between the two fronts
        budget = ByteBudget(MAX_INFLIGHT_BYTES // 2)
        grpc_front = NativeGrpcFront(options.host, options.grpc_port, server.grpc_url, limit, MAX_INFLIGHT_BYTES // 2,
                                     binary)
    fronts.append(grpc_front.start())
    http_private = (PRIVATE, int(server.ports["http"] or 0))
    fronts.append(HttpFront(options.host, options.http_port, http_private, limit, budget).start())
    return grpc_front


def _serve(server: TritonServer, supervisor: Supervisor, watchdog: Watchdog, signals: _Signals,
           grpc_front: GrpcFront | NativeGrpcFront, tick_s: float) -> None:
    """Every tick until SIGINT or SIGTERM: a dead, stopped or hung tritonserver replaced, updates rolled out, the log
    and the memory large requests left free given back."""
    history: list[float] = []
    signals.serving = True
    while not signals.stop.wait(tick_s):
        if not server.running():
            signals.serving = False  # a signal during the restart cuts it short
            _restart(server, supervisor, history, watchdog.take_reason(), signals.stop)
            watchdog.resume()
            signals.serving = True
            continue
        supervisor.tick()
        server.trim_log()
        grpc_front.trim()
