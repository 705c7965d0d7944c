"""NVIDIA's perf_analyzer against the per-task models that follow Triton's conventions, unmodified.

    .venv/bin/python bench/perf_analyzer_conventions.py RUN [--batch 8] [--concurrency 2] [--duration 6]

Serves RUN's export (a repository in a temporary folder, the bundled tritonserver on free ports) and runs
perf_analyzer 2.51 against every `<name>_<task>_pixels` model (random 0-255 pixels, batch --batch) and every
`<name>_<task>_bytes` model (PNG files given as perf_analyzer's JSON input data, batch 1: one image per request).
Writes bench/results/perf_analyzer-conventions-<name>.{json,md}. perf_analyzer comes as in
bench/perf_analyzer_crosscheck.py (the tritonclient 2.51.0 wheel, cached under $PATCHER_CACHE).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from perf_analyzer_crosscheck import VERSION, ensure_perf_analyzer

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.machine import load_average, machine_info


def png_input_data(path: Path, size: tuple[int, int], count: int = 16) -> Path:
    """perf_analyzer input data: `count` PNG images of noise, each a serialised BYTES element (length-prefixed)."""
    from PIL import Image

    rng, items = np.random.default_rng(0), []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        blob = buffer.getvalue()
        items.append({"image_bytes": {"b64": base64.b64encode(struct.pack("<I", len(blob)) + blob).decode()}})
    path.write_text(json.dumps({"data": items}))
    return path


def analyze(binary: Path, env: dict[str, str], url: str, model: str, batch: int, concurrency: int,
            duration_s: float, workdir: Path, input_data: str) -> dict[str, Any]:
    """One perf_analyzer run; its CSV figures and the end of its output."""
    report = workdir / f"{model}.csv"
    command = [str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
               f"--concurrency-range={concurrency}:{concurrency}", f"--input-data={input_data}",
               f"--measurement-interval={int(1000 * duration_s / 3)}", "--stability-percentage=100",
               "--max-trials=3", "-f", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120 + 10 * duration_s)
    row = next(csv.DictReader(report.open())) if done.returncode == 0 and report.is_file() else {}
    return {"model": model, "batch": batch, "concurrency": concurrency, "exit_code": done.returncode,
            "throughput": float(row["Inferences/Second"]) if row else None,
            "latency_ms": {k: float(row[f"{k} latency"]) / 1e3 for k in ("p50", "p99")} if row else None,
            "output_tail": (done.stdout + done.stderr).strip().splitlines()[-3:]}


def markdown(record: dict[str, Any]) -> str:
    """The Markdown report."""
    lines = [f"# perf_analyzer {VERSION} against the per-task models: {record['name']}", "",
             f"{record['created']}, {record['machine']['cpu']} ({record['machine']['usable_cores']} usable cores), "
             f"load average {record['load_average']}. Bundled Triton 2.51, python backend; perf_analyzer unmodified, "
             "synchronous gRPC.", "",
             "| model | input | batch | concurrency | exit | img/s | p50 ms | p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in record["results"]:
        latency = row["latency_ms"] or {}
        lines.append(f"| `{row['model']}` | {row['input']} | {row['batch']} | {row['concurrency']} | "
                     f"{row['exit_code']} | {row['throughput'] or '-'} | {latency.get('p50', '-')} | "
                     f"{latency.get('p99', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Serve RUN, run perf_analyzer against its per-task models, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    from patcher.triton.repository.entry import Entry
    from patcher.triton.repository.writer import write_repository
    from patcher.triton.serving.server import ServerSettings, TritonServer

    binary, env = ensure_perf_analyzer()
    results = []
    with tempfile.TemporaryDirectory(prefix="perf-conventions-") as workdir:
        written = write_repository(args.run / "onnx" if (args.run / "onnx").is_dir() else args.run,
                                   Path(workdir) / "repo")
        tasks = [m.task for m in written.models.values() if m.kind == "task_pixels"]
        entry = Entry(written.name, tuple(tasks))
        models = [m for m in entry.models() if m.kind in ("task_pixels", "task_bytes")]
        with TritonServer(Path(workdir) / "repo", settings=ServerSettings(startup_timeout_s=120)) as server:
            config = server.grpc_client().get_model_config(models[0].name, as_json=True)["config"]
            size = tuple(int(d) for d in config["input"][0]["dims"][1:])
            images = png_input_data(Path(workdir) / "images.json", size)  # type: ignore[arg-type]
            for model in models:
                pixels = model.kind == "task_pixels"
                row = analyze(binary, env, server.grpc_url, model.name, args.batch if pixels else 1,
                              args.concurrency, args.duration, Path(workdir), "random" if pixels else str(images))
                results.append({**row, "input": "random 0-255 pixels, NCHW" if pixels else "PNG files (BYTES)"})
    name = written.name
    record = {"name": name, "created": now_iso(), "machine": machine_info(), "load_average": load_average(),
              "perf_analyzer": VERSION, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"perf_analyzer-conventions-{name}.json", record)
    write_text(args.out / f"perf_analyzer-conventions-{name}.md", markdown(record))
    print(markdown(record))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
