"""Does a compiled hop that forwards no cancellation keep the bundled tritonserver alive under the burst of 1 ms
deadlines that kills it when asked directly (server#7368)? The same three hostile clients as
tests/test_faults_serving.py, up to three bursts of 10 s, first through bench/grpc_hop, then straight at a fresh
tritonserver.

    .venv/bin/python bench/grpc_hop_burst.py EXPORT_OR_RUN     # needs golang-go and golang-google-grpc-dev

Writes bench/results/grpc-hop-burst.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from serving_front import NativeHop
from serving_support import encoded, gather, hostile_clients

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.machine import load_average, machine_info

OUT = Path(__file__).parent / "results"
MODELS = ["digits", "digits_digits_bytes", "digits_fashion_mnist_bytes"]
BURST_S, BURSTS = 10, 3


def burst(repo: Path, through_hop: bool, folder: Path) -> dict[str, Any]:
    """Up to BURSTS bursts at a fresh tritonserver, through the hop or not; what was sent and how the server ended."""
    from patcher.triton.serving.ports import free_port
    from patcher.triton.serving.server import ServerSettings, TritonServer

    blob = encoded(Image.new("RGB", (28, 28), (10, 200, 30)))
    with TritonServer(repo, models=MODELS, settings=ServerSettings(startup_timeout_s=120)) as server:
        assert server.process is not None
        hop = NativeHop(f"127.0.0.1:{free_port()}", server.grpc_url, folder) if through_hop else None
        statuses: dict[str, int] = {}
        bursts, code = 0, None
        try:
            while bursts < BURSTS and code is None:
                bursts += 1
                for _, counts in gather(*hostile_clients(hop.address if hop else server.grpc_url, MODELS, BURST_S,
                                                         blob)):
                    for status, count in counts.items():
                        statuses[status] = statuses.get(status, 0) + count
                code = server.process.poll()
        finally:
            if hop:
                hop.stop()
    return {"path": "grpc_hop" if through_hop else "direct", "bursts": bursts, "requests": sum(statuses.values()),
            "statuses": statuses, "tritonserver": "alive" if code is None else f"died ({code})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    args = parser.parse_args()
    from patcher.triton.repository.writer import write_repository

    with tempfile.TemporaryDirectory(prefix="bench-hop-") as folder:
        repo = Path(folder) / "repo"
        write_repository(args.export, repo)
        rows = [burst(repo, True, Path(folder)), burst(repo, False, Path(folder))]
    record = {"created": now_iso(), "machine": machine_info(), "load_average": load_average(),
              "export": str(args.export), "burst_s": BURST_S, "rows": rows}
    lines = ["# A compiled hop under the burst of 1 ms deadlines", "",
             f"Export {args.export}; three hostile client processes, bursts of {BURST_S} s (at most {BURSTS}); "
             f"machine: {record['machine'].get('cpu', '?')}; load average at the end {record['load_average']}.", "",
             "| path | bursts | requests | answers | tritonserver |", "|---|---:|---:|---|---|"]
    for row in rows:
        answers = ", ".join(f"{status.removeprefix('StatusCode.')} {count}" for status, count in
                            sorted(row["statuses"].items(), key=lambda item: -item[1]))
        lines.append(f"| {row['path']} | {row['bursts']} | {row['requests']} | {answers} | {row['tritonserver']} |")
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "grpc-hop-burst.json", record)
    write_text(OUT / "grpc-hop-burst.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
