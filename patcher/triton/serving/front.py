"""The public gRPC endpoint of `patcher serve`: a pass-through in front of tritonserver that no client can crash it
through, and that bounds what a client can make the server hold.

Triton 2.51 (the server bundled in nvidia-pytriton) dies with SIGSEGV when gRPC requests are cancelled while
their responses complete, e.g. by clients with 1 ms deadlines (triton-inference-server/server#7368, fixed in
24.12): any model, any client, no key needed. The front forwards every call of Triton's gRPC service as opaque
bytes (metadata, the control-plane key included, passed on) to tritonserver's own gRPC port on 127.0.0.1, and never
forwards a deadline or a cancellation: a client that gives up gets DEADLINE_EXCEEDED or CANCELLED from the front,
tritonserver finishes the request normally and the answer is dropped. A request whose client has already gone when
a worker takes it up is not forwarded at all, so abandoned requests do not pile up behind good ones.

Bounds: a message larger than `max_message_bytes` is refused by gRPC itself before it is read (RESOURCE_EXHAUSTED),
and the bytes of requests being forwarded at once stay within a `ByteBudget` (a request waits for room while
its client waits, and is refused with RESOURCE_EXHAUSTED if there is none within its deadline or `wait_s`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.triton.imaging import DEFAULT_LIMITS
from patcher.triton.repository.configs import CONFIG_FILE, parameter, parse_config
from patcher.triton.repository.stores import open_store
from patcher.triton.serving.install import give_back_large_buffers, trim_free_memory

SERVICE = "inference.GRPCInferenceService"
STREAMING = {"ModelStreamInfer"}
WORKERS = 16
ENVELOPE_BYTES = 1 << 20  # a request's names, shapes and parameters around its tensors
MAX_MESSAGE_BYTES = DEFAULT_LIMITS["max_request_bytes"] + ENVELOPE_BYTES
TYPE_BYTES = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_BF16": 2, "TYPE_FP64": 8, "TYPE_INT64": 8, "TYPE_INT32": 4,
              "TYPE_UINT8": 1, "TYPE_INT8": 1, "TYPE_BOOL": 1}
MAX_INFLIGHT_BYTES = 256 << 20
WAIT_S = 30.0
IDLE_CONNECTION_S = 30.0
LARGE_BYTES = 1 << 20
UNFORWARDED_METADATA = ("user-agent", "grpc-", ":")  # set by each channel itself
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def message_limit(repo: Path | str, models: list[str] | None = None) -> int:
    """The largest request the front takes for a repository: a full batch of the largest fixed-size input, or
    max_request_bytes of encoded images, whichever is more, plus the envelope (at least MAX_MESSAGE_BYTES)."""
    store = open_store(repo)
    largest = MAX_MESSAGE_BYTES - ENVELOPE_BYTES
    for name in models if models is not None else store.models():
        try:
            config = parse_config(store.read(f"{name}/{CONFIG_FILE}") or "", f"{name}/{CONFIG_FILE}")
        except PatcherError:
            continue
        batch = max(1, config.max_batch_size)
        limits = parameter(config, "limits")
        if limits:
            largest = max(largest, int(json.loads(limits).get("max_request_bytes", 0)))
        for tensor in config.input:
            type_name = mc.DataType.Name(tensor.data_type)
            if type_name in TYPE_BYTES and all(d > 0 for d in tensor.dims):
                largest = max(largest, batch * math.prod(tensor.dims) * TYPE_BYTES[type_name])
    return largest + ENVELOPE_BYTES


class ByteBudget:
    """Bytes held at once by requests being forwarded; `take` waits for room."""

    def __init__(self, total: int) -> None:
        self.total, self.used = int(total), 0
        self._cond = threading.Condition()

    def take(self, size: int, deadline: float) -> bool:
        """Reserve `size` bytes before `deadline` (time.monotonic()); False if there was no room in time."""
        size = min(size, self.total)
        with self._cond:
            while self.used + size > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.used += size
            return True

    def give(self, size: int) -> None:
        """Return bytes taken."""
        with self._cond:
            self.used -= min(size, self.total)
            self._cond.notify_all()


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.Channel, budget: ByteBudget, wait_s: float) -> None:
        self.channel, self.budget, self.wait_s = channel, budget, wait_s
        self.forwarded = self.dropped = 0
        self.large_since_trim = False  # a large request has passed since the memory was last trimmed

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None
        if method.rsplit("/", 1)[1] in STREAMING:
            upstream_stream = self.channel.stream_stream(method)
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._stream(upstream_stream, requests, context))
        upstream = self.channel.unary_unary(method)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(upstream, request, context))

    def _unary(self, upstream: Any, request: bytes, context: grpc.ServicerContext) -> bytes:
        if not context.is_active():  # its client gave up while it queued: nothing is owed
            self.dropped += 1
            context.abort(grpc.StatusCode.CANCELLED, "the client gave up before the request was forwarded")
        remaining = context.time_remaining()
        wait = self.wait_s if remaining is None else min(self.wait_s, remaining)
        if not self.budget.take(len(request), time.monotonic() + wait):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server holds {self.budget.total} bytes of other requests: try again later")
        try:
            self.forwarded += 1
            # no timeout: tritonserver must never see a deadline or a cancellation (server#7368)
            response, call = upstream.with_call(request, metadata=_metadata(context))
        except grpc.RpcError as error:
            context.abort(error.code(), error.details() or "")
        finally:
            self.budget.give(len(request))
            self.large_since_trim = self.large_since_trim or len(request) > LARGE_BYTES
        context.set_trailing_metadata(call.trailing_metadata() or ())
        return response

    def _stream(self, upstream: Any, requests: Any, context: grpc.ServicerContext) -> Any:
        # The upstream stream ends by half-close when the client's does, never by cancellation.
        responses = upstream(_until_inactive(requests, context), metadata=_metadata(context))
        try:
            for response in responses:
                if not context.is_active():
                    break
                yield response
        finally:
            for _ in responses:  # drained, not dropped: dropping the call would cancel it upstream
                pass


def _until_inactive(requests: Any, context: grpc.ServicerContext) -> Any:
    try:
        for request in requests:
            yield request
            if not context.is_active():
                return
    except grpc.RpcError:
        return


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in context.invocation_metadata()
            if not key.startswith(UNFORWARDED_METADATA)]


class GrpcFront:
    """A gRPC pass-through on `host:port` to tritonserver's gRPC at `upstream` (host:port)."""

    def __init__(self, host: str, port: int, upstream: str, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 budget: ByteBudget | None = None) -> None:
        self.address, self.upstream = f"{host}:{port}", upstream
        self.max_message_bytes = max_message_bytes
        self.budget = budget or ByteBudget(MAX_INFLIGHT_BYTES)  # may be shared with the HTTP front
        self.workers, self.wait_s = WORKERS, WAIT_S
        self._server: grpc.Server | None = None
        self._channel: grpc.Channel | None = None
        self.forwarder: _Forwarder | None = None

    def start(self) -> GrpcFront:
        """Listen; PatcherError if the port cannot be bound."""
        give_back_large_buffers()
        self._channel = grpc.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        self.forwarder = _Forwarder(self._channel, self.budget, self.wait_s)
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0),
                   # idle HTTP/2 connections (no call under way) are closed: thousands held open took every
                   # descriptor; clients reconnect on their next call
                   ("grpc.max_connection_idle_ms", int(IDLE_CONNECTION_S * 1000))]
        server = grpc.server(futures.ThreadPoolExecutor(self.workers, thread_name_prefix="grpc-front"),
                             handlers=[self.forwarder], options=options)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError:
            bound = 0
        if not bound:
            self._channel.close()
            raise PatcherError(f"gRPC port {self.address} is in use (another server?): choose another port")
        server.start()
        self._server = server
        return self

    def trim(self) -> None:
        """Give back the memory that large requests left free (call it now and then, e.g. once a second)."""
        if self.forwarder is not None and self.forwarder.large_since_trim:
            self.forwarder.large_since_trim = False
            trim_free_memory()

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop listening; requests in flight get `grace_s` to finish."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
