"""Closed-loop gRPC load on one Triton model: N workers, one request in flight each, bounded in count and time.

Client design (measured in bench/client_engines.py, see bench/README.md): one worker thread per concurrency slot,
each making blocking unary calls on one shared gRPC channel with a request serialised once up front (the
raw ModelInferRequest bytes), so the per-request client work is gRPC's C core plus one protobuf parse of the
response. tritonclient's async_infer, grpc.aio and gRPC futures cost the same or more client CPU per request.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
MAX_ERROR_KINDS = 5


@dataclass(frozen=True)
class Payload:
    """One request, serialised once: the bytes sent for every call, and what a good answer looks like."""

    model: str
    batch_size: int
    request: bytes
    outputs: int  # raw output tensors a good response carries (0: do not check)


@dataclass(frozen=True, kw_only=True)
class Load:
    """The closed loop's shape: `concurrency` requests in flight until `duration_s` passes or `max_requests` are
    sent, whichever comes first."""

    concurrency: int
    duration_s: float
    max_requests: int = 10**9

    def check(self) -> None:
        """ValueError for a load that cannot run."""
        if self.concurrency < 1 or self.max_requests < 1 or self.duration_s <= 0:
            raise ValueError("concurrency and max_requests must be at least 1, duration_s positive")


@dataclass
class LoadResult:
    """What the client saw during one measurement: counts, wall time, per-request latencies."""

    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    latencies_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0  # steady-state time: start to deadline (or to the last answer when max_requests ended it)
    in_window: float = 0.0  # answers' shares inside window_s (see run_load): throughput = in_window / window_s
    window_rates: list[float] = field(default_factory=list)  # requests/s of each pooled window

    def __post_init__(self) -> None:
        if self.window_s <= 0 and self.elapsed_s > 0:  # no separate window: the whole measurement is one
            self.window_s, self.in_window = self.elapsed_s, self.succeeded
        if not self.window_rates and self.window_s > 0:
            self.window_rates = [self.in_window / self.window_s]

    @property
    def rate(self) -> float | None:
        """Successful requests per second in the steady-state windows (None if nothing was measured)."""
        return self.in_window / self.window_s if self.window_s > 0 and self.in_window else None

    def merge(self, other: LoadResult) -> LoadResult:
        """The sum of two measurements of the same setting (counts, time and latencies pooled)."""
        errors = Counter(self.errors)
        errors.update(other.errors)
        return LoadResult(
            sent=self.sent + other.sent,
            succeeded=self.succeeded + other.succeeded,
            failed=self.failed + other.failed,
            elapsed_s=self.elapsed_s + other.elapsed_s,
            latencies_s=np.concatenate([self.latencies_s, other.latencies_s]),
            errors=dict(errors.most_common(MAX_ERROR_KINDS)),
            window_s=self.window_s + other.window_s,
            in_window=self.in_window + other.in_window,
            window_rates=[*self.window_rates, *other.window_rates],
        )


def _tensor(name: str, datatype: str, shape: list[int], parameters: dict[str, Any] | None = None):
    tensor = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=datatype, shape=shape)
    for key, value in (parameters or {}).items():
        if isinstance(value, str):
            tensor.parameters[key].string_param = value
        else:
            tensor.parameters[key].int64_param = int(value)
    return tensor


def tensor_payload(model: str, input_name: str, array: np.ndarray, outputs: int = 0) -> Payload:
    """A float tensor request carrying its data inline (raw_input_contents)."""
    datatype = {"float32": "FP32", "float16": "FP16"}[str(array.dtype)]
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.append(_tensor(input_name, datatype, list(array.shape)))
    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return Payload(model, int(array.shape[0]), request.SerializeToString(), outputs)


def shm_payload(model: str, input_name: str, array: np.ndarray, region: str, outputs: int = 0) -> Payload:
    """A float tensor request whose data the server reads from a registered system shared-memory region."""
    datatype = {"float32": "FP32", "float16": "FP16"}[str(array.dtype)]
    request = service_pb2.ModelInferRequest(model_name=model)
    parameters = {"shared_memory_region": region, "shared_memory_byte_size": array.nbytes}
    request.inputs.append(_tensor(input_name, datatype, list(array.shape), parameters))
    return Payload(model, int(array.shape[0]), request.SerializeToString(), outputs)


def bytes_payload(model: str, input_name: str, blobs: list[bytes], outputs: int = 0) -> Payload:
    """An encoded-image request ([N, 1] BYTES), as the preprocessing ensemble takes it."""
    from tritonclient.utils import serialize_byte_tensor

    array = np.array(blobs, dtype=np.object_).reshape(-1, 1)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.append(_tensor(input_name, "BYTES", list(array.shape)))
    request.raw_input_contents.append(serialize_byte_tensor(array).item())
    return Payload(model, len(blobs), request.SerializeToString(), outputs)


def _error_text(error: grpc.RpcError) -> str:
    code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code}: {details}"


def open_channel(url: str) -> grpc.Channel:
    """A gRPC channel to a server, without message size limits (shared by every worker of a measurement)."""
    return grpc.insecure_channel(url, options=CHANNEL_OPTIONS)


def run_load(
    url: str, payload: Payload, load: Load, *, timeout_s: float = 30.0, channel: grpc.Channel | None = None,
) -> LoadResult:
    """Keep `load.concurrency` requests in flight until `load.duration_s` passes or `load.max_requests` are sent;
    wait for all.

    Every request's latency counts. Throughput is measured over the window from the start to the deadline, while
    every slot is busy: a request counts with the share of its duration that lies inside the window (1 if it
    ended before the deadline), which is unbiased however short the window is against the latency; the drain
    after the deadline does not dilute it. Pass an open `channel` to reuse its connection across measurements.
    """
    load.check()
    concurrency, max_requests = load.concurrency, load.max_requests
    owned = channel is None
    channel = channel or open_channel(url)
    call = channel.unary_unary(MODEL_INFER, request_serializer=None,
                               response_deserializer=service_pb2.ModelInferResponse.FromString)
    lock = threading.Lock()
    claimed = [0]
    start = threading.Barrier(concurrency + 1)
    clock: dict[str, float] = {}
    # per worker: (began, finished) of each good answer, and error messages counted
    per_worker: list[tuple[list[tuple[float, float]], Counter]] = [([], Counter()) for _ in range(concurrency)]

    def claim() -> bool:
        with lock:
            if claimed[0] >= max_requests or time.perf_counter() >= clock["deadline"]:
                return False
            claimed[0] += 1
            return True

    def worker(index: int) -> None:
        latencies, errors = per_worker[index]
        start.wait()
        while claim():
            began = time.perf_counter()
            try:
                response = call(payload.request, timeout=timeout_s)
            except grpc.RpcError as error:
                errors[_error_text(error)] += 1
                continue
            finished = time.perf_counter()
            if payload.outputs and len(response.raw_output_contents) != payload.outputs:
                errors[f"bad response: {len(response.raw_output_contents)} outputs, expected {payload.outputs}"] += 1
                continue
            latencies.append((began, finished))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    try:
        elapsed = _drive(threads, start, clock, load.duration_s)
    finally:
        if owned:
            channel.close()
    return _result(per_worker, claimed[0], claimed[0] >= max_requests, clock, elapsed)


def _drive(threads: list[threading.Thread], start: threading.Barrier, clock: dict[str, float],
           duration_s: float) -> float:
    """Start the workers, release them together with the clock set, wait for them; the seconds it took."""
    for thread in threads:
        thread.start()
    clock["start"] = time.perf_counter()
    clock["deadline"] = clock["start"] + duration_s
    start.wait()
    for thread in threads:
        thread.join()
    return time.perf_counter() - clock["start"]


def _result(per_worker: list[tuple[list[tuple[float, float]], Counter]], sent: int, count_ended: bool,
            clock: dict[str, float], elapsed: float) -> LoadResult:
    """The workers' answers and errors pooled, each answer counted with its share of the window (see run_load)."""
    answers = np.array([pair for worker_answers, _ in per_worker for pair in worker_answers]).reshape(-1, 2)
    errors: Counter = Counter()
    for _, worker_errors in per_worker:
        errors.update(worker_errors)
    if count_ended:  # the count ended it: every answer is in the window, which ends with the last
        window_end = float(answers[:, 1].max()) if len(answers) else clock["start"] + elapsed
    else:
        window_end = clock["deadline"]
    began, finished = answers[:, 0], answers[:, 1]
    share = np.clip((np.minimum(finished, window_end) - began) / np.maximum(finished - began, 1e-12), 0.0, 1.0)
    return LoadResult(
        sent=sent,
        succeeded=len(answers),
        failed=sum(errors.values()),
        elapsed_s=elapsed,
        latencies_s=finished - began,
        errors=dict(errors.most_common(MAX_ERROR_KINDS)),
        window_s=max(window_end - clock["start"], 1e-9),
        in_window=float(share.sum()),
    )


def warm_up(
    url: str, payload: Payload, concurrency: int, requests: int, *, timeout_s: float = 30.0,
    channel: grpc.Channel | None = None,
) -> LoadResult:
    """A few uncounted requests at the setting about to be measured (new shapes make onnxruntime allocate)."""
    return run_load(url, payload, Load(concurrency=concurrency, duration_s=timeout_s, max_requests=requests),
                    timeout_s=timeout_s, channel=channel)


def latency_summary(latencies_s: np.ndarray) -> dict[str, float | None]:
    """p50, p90, p99, mean, min and max in milliseconds (None when nothing succeeded)."""
    if latencies_s.size == 0:
        return {key: None for key in ("p50", "p90", "p99", "mean", "min", "max")}
    milliseconds = latencies_s * 1e3
    p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
    return {
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "mean": round(float(milliseconds.mean()), 4),
        "min": round(float(milliseconds.min()), 4),
        "max": round(float(milliseconds.max()), 4),
    }
