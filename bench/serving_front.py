"""What `patcher serve`'s fronts cost and spare: the same tritonserver asked directly and through the gRPC and HTTP
fronts, side by side; and what one oversized HTTP body makes tritonserver hold, directly and through the front.

    .venv/bin/python bench/serving_front.py EXPORT_OR_RUN [--seconds 5] [--rounds 3] [--concurrency 4]
        [--protocols grpc,http] [--bare] [--arenas] [--oversized-mb 400] [--out-name serving-front]

Writes a repository of the export in a temporary folder, starts the bundled tritonserver on free ports, a GrpcFront
before its gRPC port and an HttpFront before its HTTP port, and runs a closed-loop client (its own process,
`--concurrency` threads of blocking calls) for `--seconds` against each path in turn, `--rounds` times interleaved:
the patched classifier at batch 1 and 8 (tensors), and the entry's ensemble with one encoded image per request
(bytes). With --bare, a bare gRPC pass-through (a handler that only calls tritonserver: no bounds, no metadata,
no deadline handling) is measured too, as the floor of what any Python gRPC hop costs, on grpc's thread pool ("bare")
and on grpc.aio ("bare aio"). gRPC goes through both of patcher's fronts where Go and grpc-go are installed: the
compiled one (`patcher serve`'s default there, "compiled front") and the Python one ("front"). The ratios table gives,
per round, the front's throughput over the direct path's measured just before it, median and range over rounds.
Then one HTTP request announcing `--oversized-mb` of body is sent to each path while tritonserver's
resident memory is sampled. With --arenas, a second server with glibc's default arenas (MALLOC_ARENA_MAX unset by
patcher) is measured over gRPC, direct, to show what one arena costs. Writes bench/results/serving-front.{json,md}
(`--out-name` names another stem).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.machine import load_average, machine_info

OUT = Path(__file__).parent / "results"
CASES = [("patched", "tensor", 1), ("patched", "tensor", 8), ("", "bytes", 1)]


def _inputs(module: Any, config_url: str, model: str, kind: str, batch: int) -> list[Any]:
    import tritonclient.grpc as grpcclient
    from PIL import Image

    if kind == "bytes":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(buffer, "PNG")
        tensor = module.InferInput("image_bytes", [batch, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[buffer.getvalue()]] * batch, dtype=np.object_))
        return [tensor]
    config = grpcclient.InferenceServerClient(config_url).get_model_config(model).config
    dims = list(config.input[0].dims)
    tensor = module.InferInput(config.input[0].name, [batch, *dims], "FP32")
    tensor.set_data_from_numpy(np.zeros((batch, *dims), np.float32))
    return [tensor]


def _client(protocol: str, url: str, config_url: str, model: str, kind: str, batch: int, seconds: float,
            threads: int) -> dict[str, Any]:
    """Closed loop from this process: images per second and latency percentiles (ms)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module: Any = grpcclient if protocol == "grpc" else httpclient
    latencies: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        client = module.InferenceServerClient(url)
        inputs = _inputs(module, config_url, model, kind, batch)
        mine = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            client.infer(model, inputs)
            mine.append(time.monotonic() - started)
        with lock:
            latencies.extend(mine)
        client.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started  # past `seconds` by the requests under way at the end (seconds for ViT-B-32)
    ms = np.array(latencies) * 1000
    return {"images_per_s": len(latencies) * batch / elapsed, "requests": len(latencies),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def measure(protocol: str, url: str, config_url: str, model: str, kind: str, batch: int, seconds: float,
            threads: int) -> dict[str, Any]:
    """_client in a process of its own (the client's GIL is not the server's)."""
    done = subprocess.run([sys.executable, __file__, "--client", protocol, url, config_url, model, kind, str(batch),
                           str(seconds), str(threads)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class BareProxy:
    """A gRPC pass-through with nothing but the forwarding call: the floor any Python front pays."""

    def __init__(self, address: str, upstream: str) -> None:
        import grpc

        from patcher.triton.serving.front import CHANNEL_OPTIONS, SERVICE

        self.address = address
        self.channel = grpc.insecure_channel(upstream, options=CHANNEL_OPTIONS)
        calls: dict[str, Any] = {}

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                if not details.method.startswith(f"/{SERVICE}/"):
                    return None
                call = calls.get(details.method) or calls.setdefault(details.method,
                                                                     channel.unary_unary(details.method))
                return grpc.unary_unary_rpc_method_handler(lambda request, context: call(request))

        channel = self.channel
        self.server = grpc.server(ThreadPoolExecutor(16), handlers=[Handler()],
                                  options=[("grpc.max_receive_message_length", -1)])
        self.server.add_insecure_port(address)
        self.server.start()

    def stop(self) -> None:
        """Stop serving and close the upstream channel."""
        self.server.stop(1).wait()
        self.channel.close()


class AsyncBareProxy:
    """The same floor on grpc.aio (one event loop on a thread of its own instead of a thread per call): whether an
    asyncio front would forward cheaper. The upstream call is shielded, so a client that gives up does not cancel it."""

    def __init__(self, address: str, upstream: str) -> None:
        import asyncio

        self.address, self.upstream = address, upstream
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        self._started.wait(30)

    async def _serve(self) -> None:
        import asyncio

        import grpc

        from patcher.triton.serving.front import CHANNEL_OPTIONS, SERVICE

        channel = grpc.aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        calls: dict[str, Any] = {}

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                method = details.method
                if not method.startswith(f"/{SERVICE}/"):
                    return None
                call = calls.get(method) or calls.setdefault(method, channel.unary_unary(method))

                async def forward(request: bytes, context: Any) -> bytes:
                    return await asyncio.shield(call(request))

                return grpc.unary_unary_rpc_method_handler(forward)

        self._server = grpc.aio.server(handlers=[Handler()], options=[("grpc.max_receive_message_length", -1)])
        self._server.add_insecure_port(self.address)
        await self._server.start()
        self._started.set()
        await self._server.wait_for_termination()
        await channel.close()

    def stop(self) -> None:
        """Stop serving, waiting at most 5 s (the loop's thread is a daemon: it goes with the process)."""
        import asyncio

        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._server.stop(1), self.loop).result(timeout=5)


def ratios(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per setting and path other than direct: this path's img/s over direct's in the same round, median and range."""
    found = {}
    for key, runs in rows.items():
        parts = key.split(" | ")
        if parts[2] == "direct":
            continue
        direct = rows.get(" | ".join([*parts[:2], "direct", *parts[3:]]))
        if not direct:
            continue
        values = [r["images_per_s"] / d["images_per_s"] for r, d in zip(runs, direct, strict=False)]
        found[key] = {"median": float(np.median(values)), "min": min(values), "max": max(values),
                      "rounds": len(values)}
    return found


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def oversized_http(address: tuple[str, int], pid: int, megabytes: int) -> dict[str, Any]:
    """Send one request announcing `megabytes` of body (sending it while the server reads); tritonserver's RSS
    before, at its peak while the request is in flight, and 3 s after; what the client got back."""
    size = megabytes << 20
    head = (f"POST /v2/models/none/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    before, peak = _rss_mb(pid), 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent, answer, started = 0, b"", time.monotonic()
    with socket.create_connection(address, timeout=60) as connection:
        connection.sendall(head)
        block = bytes(1 << 20)
        try:
            while sent < size:
                connection.sendall(block)
                sent += len(block)
        except OSError:
            pass  # the front answered and closed
        connection.settimeout(60)
        try:
            answer = connection.recv(4096)
        except OSError:
            answer = b""
    seconds = time.monotonic() - started
    time.sleep(3)
    stop.set()
    sampler.join()
    return {"announced_mb": megabytes, "sent_mb": round(sent / (1 << 20)), "seconds": round(seconds, 2),
            "answer": answer.split(b"\r\n", 1)[0].decode(errors="replace"), "rss_before_mb": round(before),
            "rss_peak_mb": round(peak), "rss_after_3s_mb": round(_rss_mb(pid))}


def _start(repo: Path, env: dict[str, str] | None) -> Any:
    from patcher.triton.serving.server import ServerSettings, TritonServer

    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        return TritonServer(repo, settings=ServerSettings(startup_timeout_s=120)).start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _markdown(record: dict[str, Any]) -> str:
    lines = ["# The fronts of `patcher serve`: direct against through the front", "",
             f"Export {record['export']}; {record['concurrency']} client threads in their own process, "
             f"{record['seconds']:.0f} s per setting, "
             f"{record['rounds']} rounds interleaved, medians; machine: {record['machine'].get('cpu', '?')}; "
             f"load average at the end {record['load_average']}.", "",
             "| server | protocol | path | model | input | batch | img/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, value in record["results"].items():
        server_kind, protocol, path, model, kind, batch = key.split(" | ")
        lines.append(f"| {server_kind} | {protocol} | {path} | {model} | {kind} | {batch.split()[1]} | "
                     f"{value['images_per_s']:.0f} | {value['p50_ms']:.1f} | {value['p99_ms']:.1f} |")
    if record.get("ratios"):
        lines += ["", "Through a front over direct, the same round (interleaved), median [min-max] over rounds:", "",
                  "| protocol | path | model | input | batch | ratio |", "|---|---|---|---|---|---|"]
        for key, value in record["ratios"].items():
            _, protocol, path, model, kind, batch = key.split(" | ")
            lines.append(f"| {protocol} | {path} | {model} | {kind} | {batch.split()[1]} | {value['median']:.2f} "
                         f"[{value['min']:.2f}-{value['max']:.2f}] |")
    if record.get("oversized"):
        lines += ["", "One HTTP request announcing a large body, tritonserver's resident memory (MB):", "",
                  "| path | announced MB | sent MB | answer | s | RSS before | peak | 3 s after |",
                  "|---|---|---|---|---|---|---|---|"]
        for path, row in record["oversized"].items():
            lines.append(f"| {path} | {row['announced_mb']} | {row['sent_mb']} | {row['answer']} | {row['seconds']} "
                         f"| {row['rss_before_mb']} | {row['rss_peak_mb']} | {row['rss_after_3s_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--bare", action="store_true",
                        help="also bare gRPC pass-throughs, threaded and asyncio (the floors)")
    parser.add_argument("--arenas", action="store_true", help="also a server with glibc's default arenas")
    parser.add_argument("--oversized-mb", type=int, default=400, help="0: skip the oversized HTTP body")
    parser.add_argument("--out-name", default="serving-front",
                        help="results file stem in bench/results (e.g. serving-front-vit-b-32 for a second model)")
    args = parser.parse_args()

    from patcher.triton.repository.writer import write_repository
    from patcher.triton.serving.front import GrpcFront
    from patcher.triton.serving.http_front import HttpFront
    from patcher.triton.serving.native_front import NativeGrpcFront, native_front_missing
    from patcher.triton.serving.ports import free_port

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    rows: dict[str, list[dict[str, Any]]] = {}
    oversized: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-front-") as folder:
        repo = Path(folder) / "repo"
        name = write_repository(args.export, repo).name
        servers = [("patcher", None)] + ([("glibc arenas", {"MALLOC_ARENA_MAX": "64"})] if args.arenas else [])
        for server_kind, env in servers:
            server = _start(repo, env)
            grpc_front = GrpcFront("127.0.0.1", free_port(), server.grpc_url).start()
            http_port = int(server.ports["http"] or 0)
            http_front = HttpFront("127.0.0.1", free_port(), ("127.0.0.1", http_port)).start()
            paths = {("grpc", "direct"): server.grpc_url, ("grpc", "front"): grpc_front.address,
                     ("http", "direct"): f"127.0.0.1:{http_port}",
                     ("http", "front"): f"127.0.0.1:{http_front.address[1]}"}
            extra: list[Any] = []  # fronts and floors beyond patcher serve's Python ones, stopped at the end
            if native_front_missing() is None:
                extra.append(NativeGrpcFront("127.0.0.1", free_port(), server.grpc_url).start())
                paths[("grpc", "compiled front")] = extra[-1].address
            if args.bare:
                for proxy, path in ((BareProxy, "bare"), (AsyncBareProxy, "bare aio")):
                    extra.append(proxy(f"127.0.0.1:{free_port()}", server.grpc_url))
                    paths[("grpc", path)] = extra[-1].address
            chosen = {key: url for key, url in paths.items() if key[0] in protocols}
            if server_kind != "patcher":
                chosen = {("grpc", "direct"): server.grpc_url}
            try:
                for _ in range(args.rounds):
                    for suffix, kind, batch in CASES:
                        model = f"{name}_{suffix}" if suffix else name
                        for (protocol, path), url in chosen.items():
                            key = f"{server_kind} | {protocol} | {path} | {model} | {kind} | batch {batch}"
                            rows.setdefault(key, []).append(measure(protocol, url, server.grpc_url, model, kind,
                                                                    batch, args.seconds, args.concurrency))
                if server_kind == "patcher" and args.oversized_mb:
                    pid = server.process.pid
                    oversized["front"] = oversized_http(("127.0.0.1", http_front.address[1]), pid, args.oversized_mb)
                    oversized["direct"] = oversized_http(("127.0.0.1", http_port), pid, args.oversized_mb)
            finally:
                grpc_front.stop()
                http_front.stop()
                for started in extra:
                    started.stop()
                server.stop()
    summary = {key: {"images_per_s": float(np.median([r["images_per_s"] for r in runs])),
                     "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
                     "p99_ms": float(np.median([r["p99_ms"] for r in runs])), "rounds": runs}
               for key, runs in rows.items()}
    record = {"created": now_iso(), "machine": machine_info(), "load_average": load_average(),
              "export": str(args.export), "seconds": args.seconds, "rounds": args.rounds,
              "concurrency": args.concurrency, "results": summary, "ratios": ratios(rows), "oversized": oversized}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / f"{args.out_name}.json", record)
    text = _markdown(record)
    write_text(OUT / f"{args.out_name}.md", text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        protocol, url, config_url, model, kind, batch, seconds, threads = sys.argv[2:10]
        print(json.dumps(_client(protocol, url, config_url, model, kind, int(batch), float(seconds), int(threads))))
    else:
        main()
