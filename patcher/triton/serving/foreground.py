"""`patcher serve`: a server on a repository with its key in a 0600 file, rolled out and healed until stopped."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from patcher.triton.repository.stores import is_object_store
from patcher.triton.serving.access import RESTRICTED, default_key_file, new_key, remove_key_file, write_key_file
from patcher.triton.serving.server import TritonServer
from patcher.triton.serving.supervisor import Supervisor

TICK_S = 1.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_forever(
    repo: Path | str,
    models: list[str] | None = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    log_path: Path | None = None,
    startup_timeout_s: float = 120,
    echo: Callable[[str], None] = functools.partial(print, flush=True),
    key_file: Path | None = None,
    tick_s: float = TICK_S,
) -> None:
    """Start a server, write its key file, print its endpoints; roll out and heal until SIGINT/SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    grpc_url = f"{host}:{grpc_port}"
    location = str(repo) if is_object_store(repo) else str(Path(repo).resolve())
    endpoints = {"grpc": grpc_url, "http": f"http://{host}:{http_port}", "repository": location}
    key = write_key_file(new_key(), key_file or default_key_file(grpc_url), endpoints)
    server = TritonServer(repo, models, host, http_port, grpc_port, metrics_port, log_path, startup_timeout_s, key=key)
    try:
        server.start()
        echo(f"tritonserver ready in {server.timings['start_s']:.1f} s: repository {server.repo}")
        echo(f"  gRPC    {server.grpc_url}")
        echo(f"  HTTP    {server.http_url}")
        echo(f"  metrics {server.metrics_url}")
        echo(f"  models  {', '.join(server.loaded)}")
        echo(f"  key     {key.path} (0600; {', '.join(RESTRICTED)} need it)")
        echo(f"  log     {server.log_path}")
        if host not in LOOPBACK:
            echo(f"  note    inference, health and metadata are open to anyone who reaches {host}; "
                 "loading models and the other control APIs need the key")
        echo("Ctrl-C stops it.")
        supervisor = Supervisor(server, serve_all=models is None, echo=echo)
        while not stop.wait(tick_s):
            if not server.running():
                raise server.failure("tritonserver exited unexpectedly")
            supervisor.tick()
    finally:
        server.stop()
        remove_key_file(key)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    echo(f"tritonserver stopped in {server.timings.get('stop_s', 0):.1f} s")
