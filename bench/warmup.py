"""What `model_warmup` buys: the first request a new version answers, against the steady p99, with and without it.

    .venv/bin/python bench/warmup.py EXPORT [--rounds 4] [--after 300]

EXPORT is a `patcher export` folder with sample images (RUN/onnx). Each round writes version 1 of the entry with
and without warmup (interleaved ABBA over rounds), starts the bundled tritonserver on it, and for the preprocessing
model and the patched classifier in turn: a client sends batch-1 requests in a closed loop while `patcher triton`
writes version 2 and the model is loaded again (as `patcher serve` rolls out); Triton answers with version 1 until
version 2 is ready. Recorded: the latency of the first request version 2 answered, and the p50/p99 of the next
`--after` version-2 requests (steady state). Writes bench/results/warmup.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from patcher.base.files import write_json, write_text
from patcher.benchmark.machine import machine_info
from patcher.triton.repository.configs import IMAGE_BYTES
from patcher.triton.repository.export_info import load_export
from patcher.triton.repository.warmup import export_sample, input_bytes
from patcher.triton.repository.writer import RepositoryOptions, write_repository
from patcher.triton.serving.server import TritonServer

NAME = "digits"


def swapped(export: Path, folder: Path) -> Path:
    """The same export with patched and zero-shot exchanged: a new version with graphs of the same cost."""
    shutil.copytree(export, folder)
    data = json.loads((folder / "export.json").read_text())
    data["models"]["patched"], data["models"]["zeroshot"] = data["models"]["zeroshot"], data["models"]["patched"]
    (folder / "export.json").write_text(json.dumps(data, indent=2))
    return folder


def request(model: str, export: Path) -> list[Any]:
    """One batch-1 request of a model, made from the export's sample image."""
    info = load_export(export)
    sample = export_sample(info)
    assert sample is not None, f"{export} has no sample images: run `patcher export` again"
    if model.endswith("_preprocess"):
        data = np.array([[sample.png]], dtype=np.object_)
        tensor = grpcclient.InferInput(IMAGE_BYTES, [1, 1], "BYTES")
    else:
        shape = [1, *info.record.input.shape[1:]]
        data = np.frombuffer(input_bytes(sample, "image", "TYPE_FP32") or b"", np.float32).reshape(shape)
        tensor = grpcclient.InferInput("image", shape, "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def rollout(server: TritonServer, model: str, inputs: list[Any], after: int) -> dict[str, float]:
    """Closed-loop requests while `model` is loaded again with version 2: the first v2 latency, then steady."""
    answers: list[tuple[str, float]] = []
    stop = threading.Event()

    def loop() -> None:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                response = client.infer(model, inputs)
                answers.append((response.get_response().model_version, (time.perf_counter() - started) * 1e3))
        finally:
            client.close()

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.5)
    server.load_model(model)
    deadline = time.monotonic() + 120
    while sum(1 for version, _ in answers if version == "2") < after + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=60)
    latencies = [ms for version, ms in answers if version == "2"]
    steady = latencies[1 : after + 1]
    before = [ms for version, ms in answers if version == "1"][-after:]
    return {"first_ms": latencies[0], "steady_p50_ms": float(np.percentile(steady, 50)),
            "steady_p99_ms": float(np.percentile(steady, 99)), "v1_p99_ms": float(np.percentile(before, 99)),
            "first_over_p99": latencies[0] / float(np.percentile(steady, 99)), "steady_requests": len(steady)}


def one_round(export: Path, second: Path, warmup: bool, after: int, scratch: Path) -> dict[str, Any]:
    """Version 1 served, then each backend model rolled out to version 2, with or without warmup."""
    repo = scratch / f"repo-{'warm' if warmup else 'cold'}"
    shutil.rmtree(repo, ignore_errors=True)
    write_repository(export, repo, RepositoryOptions(name=NAME, warmup=warmup))
    models = [f"{NAME}_preprocess", f"{NAME}_patched"]
    results = {}
    with TritonServer(repo, models=models) as server:
        write_repository(second, repo, RepositoryOptions(name=NAME, warmup=warmup))
        for model in models:
            results[model] = rollout(server, model, request(model, export), after)
    return results


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode and model: median and range of each figure over rounds."""
    table: dict[str, Any] = {}
    for mode in ("warmup", "no_warmup"):
        for model in rounds[0][mode]:
            rows = [r[mode][model] for r in rounds]
            table.setdefault(model, {})[mode] = {
                key: {"median": statistics.median(r[key] for r in rows), "min": min(r[key] for r in rows),
                      "max": max(r[key] for r in rows)} for key in rows[0] if key != "steady_requests"}
    return table


def markdown(report: dict[str, Any]) -> str:
    """The results as a table."""
    machine = report["machine"]
    lines = [f"# model_warmup: the first request after a new version goes live ({report['date']})", "",
             f"{machine.get('cpu')} VM, {machine.get('usable_cores')} cores (load average "
             f"{machine.get('load_average_start', ['?'])[0]} at the start: shared with other work); bundled "
             "tritonserver 2.51 (python backend), "
             f"{report['rounds']} rounds interleaved ABBA, batch 1, closed loop; steady = the next {report['after']} "
             "version-2 requests. Median (min-max) over rounds, ms.", "",
             "| model | warmup | first request | steady p50 | steady p99 | first / steady p99 |",
             "|---|---|---:|---:|---:|---:|"]

    def cell(figures: dict[str, Any], key: str, digits: int = 2) -> str:
        f = figures[key]
        return f"{f['median']:.{digits}f} ({f['min']:.{digits}f}-{f['max']:.{digits}f})"

    for model, modes in report["summary"].items():
        for mode, figures in modes.items():
            lines.append(f"| {model} | {'yes' if mode == 'warmup' else 'no'} | {cell(figures, 'first_ms')} | "
                         f"{cell(figures, 'steady_p50_ms')} | {cell(figures, 'steady_p99_ms')} | "
                         f"{cell(figures, 'first_over_p99', 1)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--after", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.report_only:
        write_text(args.out / "warmup.md", markdown(json.loads((args.out / "warmup.json").read_text())))
        return
    with tempfile.TemporaryDirectory(prefix="patcher-warmup-") as folder:
        scratch = Path(folder)
        second = swapped(args.export, scratch / "second")
        rounds = []
        for index in range(args.rounds):
            order = (True, False) if index % 2 == 0 else (False, True)
            result = {}
            for warmup in order:
                result["warmup" if warmup else "no_warmup"] = one_round(args.export, second, warmup, args.after,
                                                                        scratch)
            rounds.append(result)
            print(json.dumps(result), flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "rounds": args.rounds,
              "after": args.after, "export": str(args.export), "summary": summary(rounds), "raw": rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "warmup.json", report)
    write_text(args.out / "warmup.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
