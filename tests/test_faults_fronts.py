"""Slow and many clients against `patcher serve`'s fronts (issue #30, row 2), with the bundled tritonserver: clients
that announce a 64 MiB body and send a byte at a time, hundreds of connections dripping one header line each, and
idle HTTP/2 connections to the gRPC front, all at once from 127.0.0.2, while good clients on 127.0.0.1 are answered
on both fronts within 5 s."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import Served, encoded
from triton_support import requires_bundled_triton

from patcher.triton.repository.writer import write_repository
from patcher.triton.serving.connections import MAX_PER_CLIENT

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
ATTACK_S = 40
SLOW_BODIES = 4
DRIPPING_HEADS = 300  # over the per-client cap
IDLE_HTTP2 = 300
ANSWERED_WITHIN_S = 5.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # preface, empty SETTINGS


@pytest.fixture(scope="module")
def served(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("fronts") / "repo"
    write_repository(tiny_export, repo)
    server = Served(repo, tmp_path_factory.mktemp("keys") / "serve.key.json", models=["digits"])  # what it asks
    yield server
    assert server.stop() == 0, "\n".join(server.lines[-30:])


def _attacker(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


class Attack:
    """Rows 2's three attacks at once, from 127.0.0.2, until stopped."""

    def __init__(self, served: Served) -> None:
        self.http, self.grpc = int(served.http_port), int(served.grpc_port)
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._slow_body) for _ in range(SLOW_BODIES)]
        self.threads += [threading.Thread(target=self._dripping_heads), threading.Thread(target=self._idle_http2)]

    def _open(self, port: int) -> socket.socket | None:
        with contextlib.suppress(OSError):
            sock = _attacker(port)
            self.sockets.append(sock)
            return sock
        return None

    def _slow_body(self) -> None:
        while not self.stop.is_set():
            sock = self._open(self.http)
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
                while not self.stop.wait(1.0):
                    sock.sendall(b"[")

    def _dripping_heads(self) -> None:
        heads = [s for s in (self._open(self.http) for _ in range(DRIPPING_HEADS)) if s is not None]
        for sock in heads:
            with contextlib.suppress(OSError):
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\n")
        while not self.stop.wait(2.0):
            for sock in heads:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")

    def _idle_http2(self) -> None:
        for _ in range(IDLE_HTTP2):
            sock = self._open(self.grpc)
            with contextlib.suppress(OSError, AttributeError):
                sock.sendall(PREFACE)  # type: ignore[union-attr]

    def __enter__(self) -> Attack:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        for sock in self.sockets:
            sock.close()


def _good_clients(served: Served, seconds: float) -> dict[str, list[float]]:
    """Latencies of a gRPC and an HTTP client from 127.0.0.1 sending a digit over and over (inf: failed)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    blob = np.array([encoded(Image.new("L", (28, 28), 200))], dtype=np.object_).reshape(1, 1)
    latencies: dict[str, list[float]] = {"grpc": [], "http": []}

    def run(kind: str) -> None:
        module = grpcclient if kind == "grpc" else httpclient
        url = served.grpc_url if kind == "grpc" else served.http_url
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                client = (grpcclient.InferenceServerClient(url) if kind == "grpc" else
                          httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=10))
                tensor = module.InferInput("image_bytes", [1, 1], "BYTES")
                tensor.set_data_from_numpy(blob)
                if kind == "grpc":
                    client.infer("digits", [tensor], client_timeout=10)
                else:
                    client.infer("digits", [tensor])
                client.close()
                latencies[kind].append(time.monotonic() - started)
            except Exception:  # every failure counts, whatever its type
                latencies[kind].append(float("inf"))
                time.sleep(0.2)
            time.sleep(0.05)

    threads = [threading.Thread(target=run, args=(kind,)) for kind in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def test_under_slow_and_many_clients_good_clients_are_answered_within_5_s(served: Served) -> None:
    pid = served.server_pid()
    with Attack(served):
        time.sleep(5)  # the attack in place
        latencies = _good_clients(served, ATTACK_S)
    for kind, times in latencies.items():
        within = sum(t <= ANSWERED_WITHIN_S for t in times) / max(len(times), 1)
        slowest = max(times)
        print(f"{kind}: {len(times)} requests, {100 * within:.1f}% within {ANSWERED_WITHIN_S} s, "
              f"median {np.median(times) * 1000:.0f} ms, slowest {slowest:.1f} s")
        assert len(times) >= 20 and within >= 0.99, (kind, len(times), within, sorted(times)[-5:])
    assert served.server_pid() == pid


def test_one_client_holds_at_most_its_share_of_connections(served: Served) -> None:
    held, refused = [], 0
    try:
        for _ in range(MAX_PER_CLIENT + 10):
            sock = _attacker(int(served.http_port))
            held.append(sock)
        time.sleep(1)
        for sock in held:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                if sock.recv(4096).startswith(b"HTTP/1.1 503 "):
                    refused += 1
        assert refused == 10, refused
    finally:
        for sock in held:
            sock.close()
