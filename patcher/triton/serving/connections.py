"""The HTTP front's client connections: how many one client may hold, how many all may hold, and a deadline each.

A slow client must not hold what good clients need. Each connection has a deadline for what it is doing: the first
byte of its next request within IDLE_S, the rest of the request head within HEAD_S of its first line, the body
within BODY_S plus its size at MIN_BODY_RATE (bytes a second); a reaper thread shuts down every connection past its
deadline. One client address holds at most `max_per_client` connections; when all `max_connections` are taken, the
connection idle the longest (waiting for a next request) is closed to make room, so that a new client is refused
only when every connection is busy with a request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

IDLE_S = 60.0
HEAD_S = 10.0
BODY_S = 10.0
MIN_BODY_RATE = 256 << 10
MAX_PER_CLIENT = 64
REAP_EVERY_S = 0.5


@dataclass
class _Entry:
    client: str
    deadline: float
    idle_since: float | None  # waiting for the first byte of a request since then; None while busy


class ConnectionTable:
    """Connections of one front, by socket: admitted under both caps, reaped past their deadlines."""

    def __init__(self, max_connections: int, max_per_client: int = MAX_PER_CLIENT) -> None:
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.evicted = self.reaped = 0
        self._entries: dict[socket.socket, _Entry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._reap, name="http-front-reaper", daemon=True).start()

    def __len__(self) -> int:
        return len(self._entries)

    def admit(self, sock: socket.socket, client: str) -> str | None:
        """Take a new connection (None), or say why not; when full, close the longest-idle one to make room."""
        now = time.monotonic()
        with self._lock:
            if sum(1 for entry in self._entries.values() if entry.client == client) >= self.max_per_client:
                return f"{client} holds {self.max_per_client} connections already: reuse them (keep-alive)"
            if len(self._entries) >= self.max_connections:
                idle = [(entry.idle_since, s) for s, entry in self._entries.items() if entry.idle_since is not None]
                if not idle:
                    return f"all {self.max_connections} connections are busy with requests: try again shortly"
                _, oldest = min(idle, key=lambda pair: pair[0])
                self._close(oldest)
                self.evicted += 1
            self._entries[sock] = _Entry(client, now + IDLE_S, now)
        return None

    def waiting(self, sock: socket.socket) -> None:
        """The connection waits for the first byte of its next request."""
        now = time.monotonic()
        self._set(sock, now + IDLE_S, now)

    def reading_head(self, sock: socket.socket) -> None:
        """The request line arrived: the rest of the head has HEAD_S."""
        self._set(sock, time.monotonic() + HEAD_S, None)

    def reading_body(self, sock: socket.socket, length: int) -> None:
        """The head is complete: the body has BODY_S plus its length at MIN_BODY_RATE."""
        self._set(sock, time.monotonic() + BODY_S + length / MIN_BODY_RATE, None)

    def answering(self, sock: socket.socket) -> None:
        """The request is with tritonserver: no deadline (an inference takes as long as it takes)."""
        self._set(sock, float("inf"), None)

    def remove(self, sock: socket.socket) -> None:
        """Forget a closed connection."""
        with self._lock:
            self._entries.pop(sock, None)

    def close_all(self) -> None:
        """Shut every connection down (the front stops)."""
        self._stop.set()
        with self._lock:
            for sock in list(self._entries):
                self._close(sock)

    def _set(self, sock: socket.socket, deadline: float, idle_since: float | None) -> None:
        with self._lock:
            entry = self._entries.get(sock)
            if entry is not None:
                entry.deadline, entry.idle_since = deadline, idle_since

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _reap(self) -> None:
        while not self._stop.wait(REAP_EVERY_S):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, entry in self._entries.items() if entry.deadline < now]
                for sock in late:
                    self._close(sock)
                    self._entries[sock].deadline = float("inf")  # shut down once; its thread removes it
                self.reaped += len(late)
