"""What `patcher serve`'s gRPC front costs: the same tritonserver asked directly and through the front, side by side.

    .venv/bin/python bench/serving_front.py EXPORT_OR_RUN [--seconds 5] [--rounds 3] [--concurrency 4]

Writes a repository of the export in a temporary folder, starts the bundled tritonserver on free ports and a
GrpcFront before its gRPC port, and runs a closed-loop client (its own process, `--concurrency` threads of blocking
unary calls) for `--seconds` against each path in turn, `--rounds` times interleaved: the patched classifier at
batch 1 and 8 (tensors), and the entry's ensemble with one encoded image per request (bytes). A second server with
glibc's default arenas (MALLOC_ARENA_MAX unset by patcher) is measured the same way, to show what one arena costs.
Writes bench/results/serving-front.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.machine import load_average, machine_info

OUT = Path(__file__).parent / "results"


def _client(url: str, model: str, kind: str, batch: int, seconds: float, threads: int) -> dict[str, Any]:
    """Closed loop from this process: images per second and latency percentiles (ms)."""
    import tritonclient.grpc as grpcclient
    from PIL import Image

    latencies: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        client = grpcclient.InferenceServerClient(url)
        config = client.get_model_config(model).config
        if kind == "bytes":
            buffer = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(buffer, "PNG")
            tensor = grpcclient.InferInput("image_bytes", [batch, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[buffer.getvalue()]] * batch, dtype=np.object_))
        else:
            dims = list(config.input[0].dims)
            tensor = grpcclient.InferInput(config.input[0].name, [batch, *dims], "FP32")
            tensor.set_data_from_numpy(np.zeros((batch, *dims), np.float32))
        mine = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            client.infer(model, [tensor])
            mine.append(time.monotonic() - started)
        with lock:
            latencies.extend(mine)
        client.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ms = np.array(latencies) * 1000
    return {"images_per_s": len(latencies) * batch / seconds, "requests": len(latencies),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def measure(url: str, model: str, kind: str, batch: int, seconds: float, threads: int) -> dict[str, Any]:
    """_client in a process of its own (the client's GIL is not the server's)."""
    done = subprocess.run([sys.executable, __file__, "--client", url, model, kind, str(batch), str(seconds),
                           str(threads)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    from patcher.triton.repository.writer import write_repository
    from patcher.triton.serving.front import GrpcFront
    from patcher.triton.serving.ports import free_port
    from patcher.triton.serving.server import TritonServer

    cases = [("patched", "tensor", 1), ("patched", "tensor", 8), ("", "bytes", 1)]
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-front-") as folder:
        written = write_repository(args.export, Path(folder) / "repo")
        name = written["name"]
        for server_kind, env in (("patcher", None), ("glibc arenas", {"MALLOC_ARENA_MAX": "64"})):
            saved = {key: os.environ.get(key) for key in (env or {})}
            os.environ.update(env or {})
            try:
                server = TritonServer(Path(folder) / "repo", startup_timeout_s=120).start()
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            front = GrpcFront("127.0.0.1", free_port(), server.grpc_url).start()
            paths = {"direct": server.grpc_url, "front": front.address}
            if server_kind != "patcher":
                paths = {"direct": server.grpc_url}
            try:
                for _ in range(args.rounds):
                    for suffix, kind, batch in cases:
                        model = f"{name}_{suffix}" if suffix else name
                        for path, url in paths.items():
                            key = f"{server_kind} | {path} | {model} | {kind} | batch {batch}"
                            rows.setdefault(key, []).append(measure(url, model, kind, batch, args.seconds,
                                                                    args.concurrency))
            finally:
                front.stop()
                server.stop()
    summary = {key: {"images_per_s": float(np.median([r["images_per_s"] for r in runs])),
                     "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
                     "p99_ms": float(np.median([r["p99_ms"] for r in runs])), "rounds": runs}
               for key, runs in rows.items()}
    record = {"created": now_iso(), "machine": machine_info(), "load_average": load_average(),
              "export": str(args.export), "seconds": args.seconds, "rounds": args.rounds,
              "concurrency": args.concurrency, "results": summary}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "serving-front.json", record)
    lines = ["# The gRPC front of `patcher serve`: direct against through the front", "",
             f"{args.concurrency} client threads in their own process, {args.seconds:.0f} s per setting, "
             f"{args.rounds} rounds interleaved, medians; machine: {record['machine'].get('cpu', '?')}; "
             f"load average at the end {record['load_average']}.", "",
             "| server | path | model | input | batch | img/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for key, value in summary.items():
        server_kind, path, model, kind, batch = key.split(" | ")
        lines.append(f"| {server_kind} | {path} | {model} | {kind} | {batch.split()[1]} | "
                     f"{value['images_per_s']:.0f} | {value['p50_ms']:.1f} | {value['p99_ms']:.1f} |")
    write_text(OUT / "serving-front.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        url, model, kind, batch, seconds, threads = sys.argv[2:8]
        print(json.dumps(_client(url, model, kind, int(batch), float(seconds), int(threads))))
    else:
        main()
