"""Which client makes the most faithful load generator here: client CPU per request and what the server then does.

    .venv/bin/python bench/client_engines.py RUN [--duration 3] [--rounds 4]

Serves the run's patched model (threads 1, no batching delay) and drives it at a few settings with four clients,
interleaved so drift cancels: tritonclient's async_infer (callbacks), gRPC futures on pre-serialised bytes,
grpc.aio on pre-serialised bytes, and patcher's loader (a blocking thread per slot, pre-serialised bytes).
On a machine where client and server share cores, every client CPU-second is taken from the server, so the
client with the least CPU per request measures the server most faithfully. Writes bench/results/client_engines.*.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from patcher.base.files import now_iso, write_json
from patcher.benchmark.loadgen import CHANNEL_OPTIONS, MODEL_INFER, Load, open_channel, run_load
from patcher.benchmark.machine import load_average, machine_info

SETTINGS = [(1, 1), (1, 4), (8, 4)]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _request(model: str, batch: int, size: tuple[int, int]) -> tuple[bytes, Any]:
    import tritonclient.grpc as tc

    array = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
    tensor = tc.InferInput("image", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.append(tensor._get_tensor())
    request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString(), tensor


def tritonclient_async(url: str, model: str, tensor: Any, concurrency: int, requests: int) -> list[float]:
    """tritonclient.grpc's async_infer, the next request issued from each callback."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    lock, done, state = threading.Lock(), threading.Event(), {"sent": concurrency, "latencies": []}

    def issue() -> None:
        began = time.perf_counter()
        client.async_infer(model, [tensor], lambda result, error: finished(began, error))

    def finished(began: float, error: Any) -> None:
        with lock:
            state["latencies"].append(time.perf_counter() - began)
            more = state["sent"] < requests
            state["sent"] += more
            if len(state["latencies"]) >= requests:
                done.set()
        if more:
            issue()

    for _ in range(concurrency):
        issue()
    done.wait(300)
    client.close()
    return state["latencies"]


def grpc_futures(url: str, model: str, data: bytes, concurrency: int, requests: int) -> list[float]:
    """Raw gRPC futures on pre-serialised request bytes, the next request issued from each done-callback."""
    channel = open_channel(url)
    call = channel.unary_unary(MODEL_INFER, request_serializer=None,
                               response_deserializer=service_pb2.ModelInferResponse.FromString)
    lock, done, state = threading.Lock(), threading.Event(), {"sent": concurrency, "latencies": []}

    def issue() -> None:
        began = time.perf_counter()
        call.future(data).add_done_callback(lambda future: finished(began, future))

    def finished(began: float, future: Any) -> None:
        future.result()
        with lock:
            state["latencies"].append(time.perf_counter() - began)
            more = state["sent"] < requests
            state["sent"] += more
            if len(state["latencies"]) >= requests:
                done.set()
        if more:
            issue()

    for _ in range(concurrency):
        issue()
    done.wait(300)
    channel.close()
    return state["latencies"]


def grpc_aio(url: str, model: str, data: bytes, concurrency: int, requests: int) -> list[float]:
    """grpc.aio on pre-serialised bytes: one asyncio task per concurrency slot."""

    async def main() -> list[float]:
        channel = grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
        call = channel.unary_unary(MODEL_INFER, request_serializer=None,
                                   response_deserializer=service_pb2.ModelInferResponse.FromString)
        state = {"sent": 0, "latencies": []}

        async def worker() -> None:
            while state["sent"] < requests:
                state["sent"] += 1
                began = time.perf_counter()
                await call(data)
                state["latencies"].append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await channel.close()
        return state["latencies"]

    return asyncio.run(main())


def patcher_threads(url: str, model: str, payload: Any, concurrency: int, requests: int) -> list[float]:
    """patcher.bench.loadgen.run_load: a blocking thread per slot."""
    load = Load(concurrency=concurrency, duration_s=300, max_requests=requests)
    return list(run_load(url, payload, load).latencies_s)


def compare(url: str, model: str, size: tuple[int, int], duration_s: float, rounds: int) -> list[dict[str, Any]]:
    """Each client at each setting, ABBA over rounds; requests per run sized to about duration_s."""
    from patcher.benchmark.loadgen import Payload

    rows = []
    for batch, concurrency in SETTINGS:
        data, tensor = _request(model, batch, size)
        payload = Payload(model, batch, data, 0)
        engines = {
            "tritonclient async_infer": lambda n, c=concurrency, t=tensor: tritonclient_async(url, model, t, c, n),
            "gRPC futures, raw bytes": lambda n, c=concurrency, d=data: grpc_futures(url, model, d, c, n),
            "grpc.aio, raw bytes": lambda n, c=concurrency, d=data: grpc_aio(url, model, d, c, n),
            "patcher (thread per slot)": lambda n, c=concurrency, p=payload: patcher_threads(url, model, p, c, n),
        }
        probe = time.perf_counter()
        engines["patcher (thread per slot)"](50)
        per_request = (time.perf_counter() - probe) / 50
        requests = max(50, int(duration_s / rounds / per_request))
        pooled: dict[str, dict[str, Any]] = {name: {"latencies": [], "elapsed": 0.0, "cpu": 0.0} for name in engines}
        for index in range(rounds):
            for name in (list(engines) if index % 2 == 0 else list(reversed(engines))):
                engines[name](min(requests, 20))  # warm-up
                began, cpu = time.perf_counter(), _cpu()
                latencies = engines[name](requests)
                pooled[name]["elapsed"] += time.perf_counter() - began
                pooled[name]["cpu"] += _cpu() - cpu
                pooled[name]["latencies"] += latencies
        for name, data_ in pooled.items():
            latencies = np.array(data_["latencies"]) * 1e3
            rows.append({
                "client": name, "batch": batch, "concurrency": concurrency, "requests": len(latencies),
                "throughput": round(batch * len(latencies) / data_["elapsed"], 1),
                "client_cpu_ms_per_request": round(1e3 * data_["cpu"] / len(latencies), 4),
                "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            })
            print(rows[-1], flush=True)
    return rows


def markdown(record: dict[str, Any]) -> str:
    """The comparison as Markdown."""
    lines = [
        "# Load-generator clients compared",
        "",
        f"{record['created']}, {record['machine']['cpu']} ({record['machine']['usable_cores']} usable cores), load "
        f"average {record['machine']['load_average_start']} -> {record['load_average_end']}; run "
        f"`{record['run']}`, model `{record['model']}`; {record['rounds']} rounds ABBA.",
        "",
        "| client | batch | concurrency | requests | img/s | client CPU ms / request | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['client']} | {r['batch']} | {r['concurrency']} | {r['requests']} | {r['throughput']} | "
              f"{r['client_cpu_ms_per_request']} | {r['p50_ms']} | {r['p99_ms']} |" for r in record["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from patcher.runs.manifest import load_run
    from patcher.stages.bench import ensure_export
    from patcher.triton.repository.writer import RepositoryOptions, write_repository
    from patcher.triton.serving.ports import distinct_free_ports
    from patcher.triton.serving.server import ServerPorts, TritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per client and setting")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    run = load_run(args.run)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="patcher-engines-") as workdir:
        repo = Path(workdir) / "repo"
        written = write_repository(ensure_export(run), repo,
                                   RepositoryOptions(max_queue_delay_us=0, intra_op_threads=1))
        model = f"{written.name}_patched"
        size = tuple(run.manifest.model.preprocess.image_size)
        http, grpc_port, metrics = distinct_free_ports(3)
        ports = ServerPorts(http=http, grpc=grpc_port, metrics=metrics)
        with TritonServer(repo, models=[model], ports=ports) as server:
            rows = compare(server.grpc_url, model, size, args.duration, args.rounds)  # type: ignore[arg-type]
    record = {"format": "patcher-client-engines/1", "created": now_iso(), "run": run.name, "model": model,
              "rounds": args.rounds, "machine": machine, "load_average_end": load_average(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "client_engines.json", record)
    (args.out / "client_engines.md").write_text(markdown(record))
    print(f"wrote {args.out / 'client_engines.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
