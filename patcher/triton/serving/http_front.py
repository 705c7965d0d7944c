"""The public HTTP endpoint of `patcher serve`: a pass-through in front of tritonserver's HTTP port that bounds what a
client can make the server hold, as the gRPC front does for gRPC.

Triton 2.51's HTTP server reads a request's whole body, however large, before anything checks it, and parses its
JSON with a recursive parser. The front reads each request's head, refuses a body over `max_body_bytes` (413) or of
unknown length (411) before reading a byte of it, reads the JSON part and refuses one nested too deeply (400,
`json_guard.py`), then streams the request to tritonserver's HTTP port on 127.0.0.1 and the response back, framed
by its own headers. Body bytes count against the byte budget it shares with the gRPC front as they arrive (503
when there is no room within `wait_s`), so a slow client holds only what it has sent. Connections are capped per
client address and in all, and each has a deadline for its request head and body (`connections.py`).
One upstream connection serves one client connection; requests on it are forwarded one at a time, in order.
A client that goes away once its request is sent leaves it to finish in tritonserver; the answer is read and dropped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from patcher.base.errors import PatcherError
from patcher.triton.serving.connections import IDLE_S, MAX_PER_CLIENT, ConnectionTable
from patcher.triton.serving.front import MAX_INFLIGHT_BYTES, MAX_MESSAGE_BYTES, WAIT_S, ByteBudget
from patcher.triton.serving.json_guard import JsonRefused, check_json, json_part_length

MAX_HEAD_BYTES = 64 << 10
MAX_CONNECTIONS = 1024  # two file descriptors each; `patcher serve` raises its open-file limit to 4096
CHUNK_BYTES = 1 << 20
RECEIVE_BYTES = 256 << 10  # a body is read (and counted against the byte budget) in blocks of at most this
LINGER_S, LINGER_BYTES = 2.0, 4 << 20  # what a refused client may still send before the front closes on it
HOP_BY_HOP = (b"expect",)  # answered by the front itself; never forwarded
STATUS_TEXT = {400: "Bad Request", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
               502: "Bad Gateway", 503: "Service Unavailable"}


class _Refused(Exception):
    """A request the front answers itself, with this status and message, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _ClientGone(Exception):
    """The client closed its connection or stalled past IDLE_S."""


def _read_head(stream: BinaryIO, started: Callable[[], None] | None = None) -> bytes | None:
    """The request or response head up to its blank line; None at a clean end of stream. `started` is called once
    its first line has arrived."""
    lines, size = [], 0
    while True:
        line = stream.readline(MAX_HEAD_BYTES + 1)
        if not line:
            if lines:
                raise _ClientGone()
            return None
        size += len(line)
        if size > MAX_HEAD_BYTES:
            raise _Refused(400, f"request head larger than {MAX_HEAD_BYTES} bytes")
        if not lines and line in (b"\r\n", b"\n"):  # stray blank lines between requests are allowed (RFC 9112)
            continue
        lines.append(line)
        if len(lines) == 1 and started is not None:
            started()
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _headers(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The start line and the header fields (names lower-cased; repeated fields joined by commas)."""
    start, *fields = head.rstrip(b"\r\n").split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for field in fields:
        name, sep, value = field.partition(b":")
        if not sep or not name.strip():
            raise _Refused(400, f"malformed header line {field[:80]!r}")
        key = name.strip().lower()
        headers[key] = headers[key] + b"," + value.strip() if key in headers else value.strip()
    return start, headers


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    values = {v.strip() for v in raw.split(b",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise _Refused(400, f"invalid Content-Length {raw[:40]!r}")
    return int(next(iter(values)))


class _Received:
    """A request body read as it arrives, each block counted against the byte budget once it is here (not the
    size the head announced): a client that sends slowly holds only what it has sent."""

    def __init__(self, source: BinaryIO, budget: ByteBudget, wait_s: float) -> None:
        self.source, self.budget, self.wait_s = source, budget, wait_s
        self.held = 0

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes (fewer only if the client leaves: _ClientGone)."""
        blocks = []
        while size > 0:
            block = self.source.read1(min(size, RECEIVE_BYTES))  # type: ignore[attr-defined]
            if not block:
                raise _ClientGone()
            if not self.budget.take(len(block), time.monotonic() + self.wait_s):
                raise _Refused(503, f"the server holds {self.budget.total} bytes of other requests: try again later")
            self.held += len(block)
            size -= len(block)
            blocks.append(block)
        return b"".join(blocks)

    def copy(self, target: socket.socket, size: int) -> None:
        """Forward exactly `size` bytes as they arrive."""
        while size > 0:
            block = self.read(min(size, RECEIVE_BYTES))
            size -= len(block)
            target.sendall(block)

    def release(self) -> None:
        """Give the bytes held back to the budget."""
        self.budget.give(self.held)
        self.held = 0


def _refusal(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _linger(client: socket.socket) -> None:
    """Half-close after a refusal and discard what the client still sends, for at most LINGER_S and LINGER_BYTES.

    Closing a socket with unread bytes in it sends a reset, and a reset can reach the client before it has read the
    refusal (the client that sent a body after its head loses the answer); this is nginx's lingering close.
    """
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        discarded = 0
        while discarded < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            client.settimeout(left)
            block = client.recv(CHUNK_BYTES)
            if not block:
                return
            discarded += len(block)


class _Relay:
    """Send a response to a client that may have gone: after the first failure, bytes are dropped."""

    def __init__(self, client: socket.socket) -> None:
        self.client: socket.socket | None = client
        self.started = False  # a byte of the answer has gone out (an error can no longer be answered)

    def send(self, data: bytes) -> None:
        if self.client is None:
            return
        self.started = True
        try:
            self.client.sendall(data)
        except OSError:
            self.client = None


def _forward_response(upstream: BinaryIO, relay: _Relay, method: bytes) -> bool:
    """Pass one response back, framed by its own headers; True if the connection may carry another request."""
    while True:
        head = _read_head(upstream)
        if head is None:
            raise ConnectionError("tritonserver closed the connection without an answer")
        start, headers = _headers(head)
        relay.send(head)
        status = int(start.split(b" ", 2)[1])
        if status >= 200 or status == 101:
            break
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return status != 101
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size_line = upstream.readline(MAX_HEAD_BYTES)
            relay.send(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                trailer = _read_head(upstream) or b"\r\n"
                relay.send(trailer)
                break
            _relay_exactly(upstream, relay, size + 2)
    else:
        length = _content_length(headers)
        if length is None:  # framed by the end of the connection
            while block := upstream.read1(CHUNK_BYTES):
                relay.send(block)
            return False
        _relay_exactly(upstream, relay, length)
    return b"close" not in headers.get(b"connection", b"").lower()


def _relay_exactly(source: BinaryIO, relay: _Relay, size: int) -> None:
    while size > 0:
        block = source.read(min(size, CHUNK_BYTES))
        if not block:
            raise ConnectionError("tritonserver closed the connection mid-answer")
        size -= len(block)
        relay.send(block)


class HttpFront:
    """An HTTP/1.1 pass-through on `host:port` to tritonserver's HTTP port at `upstream` (host, port)."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], max_body_bytes: int = MAX_MESSAGE_BYTES,
                 budget: ByteBudget | None = None) -> None:
        self.address, self.upstream = (host, port), upstream
        self.max_body_bytes, self.wait_s, self.max_connections = max_body_bytes, WAIT_S, MAX_CONNECTIONS
        self.budget = budget or ByteBudget(MAX_INFLIGHT_BYTES)
        self.forwarded = self.refused = 0
        self._listener: socket.socket | None = None
        self.connections = ConnectionTable(MAX_CONNECTIONS, MAX_PER_CLIENT)
        self._stopping = threading.Event()

    def start(self) -> HttpFront:
        """Listen; PatcherError if the port cannot be bound."""
        listener = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(self.address)
        except OSError:
            listener.close()
            raise PatcherError(f"HTTP port {self.address[0]}:{self.address[1]} is in use (another server?): "
                               "choose another port") from None
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, name="http-front", daemon=True).start()
        return self

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when asked for port 0)."""
        assert self._listener is not None, "start() the front first"
        return int(self._listener.getsockname()[1])

    def stop(self) -> None:
        """Stop listening and close every connection."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        self.connections.close_all()

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None and not self._stopping.is_set():
            try:
                client, address = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.1)  # e.g. out of file descriptors: the connections being served free some
                continue
            refusal = self.connections.admit(client, str(address[0]))
            if refusal is not None:
                self.refused += 1
                with contextlib.suppress(OSError):
                    client.setblocking(False)  # a client that reads nothing must not hold the accepting thread
                    client.send(_refusal(503, refusal))
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), name="http-front-connection", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(IDLE_S)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # heads and bodies go as separate writes
            reader = client.makefile("rb")
            try:
                upstream = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                raise _Refused(503, "tritonserver is not taking connections (restarting?): try again shortly") from None
            upstream.settimeout(None)  # an inference takes as long as it takes; the client's connection has IDLE_S
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream_reader = upstream.makefile("rb")
            while not self._stopping.is_set():
                if not self._one_request(client, reader, upstream, upstream_reader):
                    break
        except _Refused as refused:
            self.refused += 1
            _Relay(client).send(_refusal(refused.status, refused.message))
            _linger(client)
        except (_ClientGone, TimeoutError, ConnectionError, OSError, ValueError, IndexError):
            pass
        finally:
            self.connections.remove(client)
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _one_request(self, client: socket.socket, reader: BinaryIO, upstream: socket.socket,
                     upstream_reader: BinaryIO) -> bool:
        """Forward one request and its answer; True if the client may send another on this connection."""
        self.connections.waiting(client)
        head = _read_head(reader, lambda: self.connections.reading_head(client))
        if head is None:
            return False
        start, headers = _headers(head)
        parts = start.split(b" ")
        if len(parts) != 3:
            raise _Refused(400, f"malformed request line {start[:80]!r}")
        method, _, version = parts
        if headers.get(b"transfer-encoding"):
            raise _Refused(411, "a request body of unknown length (Transfer-Encoding) is not accepted: "
                                "send Content-Length")
        length = _content_length(headers) or 0
        if length > self.max_body_bytes:
            raise _Refused(413, f"request body of {length} bytes is larger than this server takes "
                                f"({self.max_body_bytes} bytes): send fewer or smaller images per request")
        body = _Received(reader, self.budget, self.wait_s)
        self.connections.reading_body(client, length)
        try:
            if b"100-continue" in headers.get(b"expect", b"").lower():
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                json_bytes = json_part_length(headers, length)
                json_part = body.read(json_bytes)
                check_json(json_part)
            except JsonRefused as error:
                raise _Refused(400, str(error)) from None
            relay = _Relay(client)
            try:
                upstream.sendall(_without(head, HOP_BY_HOP) + json_part)
                body.copy(upstream, length - json_bytes)
                self.connections.answering(client)
                self.forwarded += 1
                keep = _forward_response(upstream_reader, relay, method)
            except (ConnectionError, BrokenPipeError) as error:
                if relay.started:
                    raise
                raise _Refused(502, f"tritonserver closed the connection ({error}; restarting?): "
                                    "try again shortly") from None
        finally:
            body.release()
        client_closes = b"close" in headers.get(b"connection", b"").lower() or (
            version == b"HTTP/1.0" and b"keep-alive" not in headers.get(b"connection", b"").lower())
        return keep and not client_closes


def _without(head: bytes, names: tuple[bytes, ...]) -> bytes:
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in names]
    return b"\r\n".join(kept)
