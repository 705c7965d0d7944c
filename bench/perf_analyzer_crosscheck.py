"""Cross-check patcher's load generator against NVIDIA's perf_analyzer at one setting (model, batch, concurrency).

    .venv/bin/python bench/perf_analyzer_crosscheck.py RUN [--batch 8] [--concurrency 4] [--duration 10]
    .venv/bin/python bench/perf_analyzer_crosscheck.py --url 127.0.0.1:8001 --model digits_patched

With RUN it serves the run's patched model itself (the same repository settings as `bench_run`). The two tools
take turns (patcher, perf_analyzer, perf_analyzer, patcher, ...) so drift on a shared machine cancels, and the
comparison goes to bench/results/perf_analyzer_crosscheck-<name>.{json,md}.

perf_analyzer comes from the `tritonclient==2.51.0` wheel (newer ones need glibc 2.38): downloaded once with
`pip download --no-deps` into $PATCHER_CACHE/perf_analyzer (default ~/.cache/patcher/perf_analyzer), never into
the virtualenv; a folder of links (libb64.so.0d, libcudart.so.12 -> nvidia_pytriton.libs) goes on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.files import now_iso, write_json
from patcher.benchmark import server_stats
from patcher.benchmark.defaults import DEFAULT_MAX_QUEUE_DELAY_US
from patcher.benchmark.loadgen import Load, run_load, warm_up
from patcher.benchmark.machine import load_average, machine_info
from patcher.benchmark.results import Setting, result_row
from patcher.benchmark.targets import inspect_target, payload

VERSION = "2.51.0"
WHEEL_BINARY = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
LIBRARY_LINKS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
TOLERANCE = 0.10


def cache_dir() -> Path:
    """Where perf_analyzer is unpacked: $PATCHER_CACHE/perf_analyzer/<version>, else ~/.cache/patcher/..."""
    root = os.environ.get("PATCHER_CACHE") or Path.home() / ".cache" / "patcher"
    return Path(root) / "perf_analyzer" / VERSION


def pytriton_libs() -> Path:
    """The nvidia_pytriton.libs folder that holds libb64 and libcudart."""
    from patcher.triton.serving.install import find_tritonserver

    return find_tritonserver().libs


def ensure_perf_analyzer(folder: Path | None = None) -> tuple[Path, dict[str, str]]:
    """perf_analyzer's path and the environment it runs in; downloads the wheel into the cache the first time."""
    folder = folder or cache_dir()
    binary, links = folder / "bin" / "perf_analyzer", folder / "lib"
    if not binary.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as download:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", f"tritonclient=={VERSION}", "-d", download]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            wheels = list(Path(download).glob("tritonclient-*.whl"))
            if done.returncode or not wheels:
                raise PatcherError(f"pip download tritonclient=={VERSION} failed: {done.stderr.strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                binary.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(WHEEL_BINARY) as source, open(binary, "wb") as target:
                    shutil.copyfileobj(source, target)
        binary.chmod(0o755)
    links.mkdir(exist_ok=True)
    libs = pytriton_libs()
    for name, pattern in LIBRARY_LINKS.items():
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise PatcherError(f"{libs} has no {pattern}: install nvidia-pytriton==0.7.0")
        link = links / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(links), env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def run_perf_analyzer(binary: Path, env: dict[str, str], url: str, model: str, batch: int, concurrency: int,
                      duration_s: float, workdir: Path) -> dict[str, Any]:
    """One perf_analyzer measurement (sync gRPC, `concurrency` threads, three windows of duration/3); its CSV row."""
    report = workdir / "perf_analyzer.csv"
    window_ms = max(500, int(1000 * duration_s / 3))
    command = [
        str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
        f"--concurrency-range={concurrency}:{concurrency}", "--sync", "--input-data=random",
        "--measurement-mode=time_windows", f"--measurement-interval={window_ms}",
        "--stability-percentage=100", "--max-trials=3", "-f", str(report),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120 + 10 * duration_s)
    if done.returncode:
        raise PatcherError(f"perf_analyzer failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-400:]}")
    with open(report) as handle:
        row = next(csv.DictReader(handle))
    return {
        "throughput": float(row["Inferences/Second"]),
        "latency_ms": {key: float(row[f"{key} latency"]) / 1e3 for key in ("p50", "p90", "p99")},
        "server_queue_ms": float(row["Server Queue"]) / 1e3,
        "server_compute_ms": sum(float(row[k]) for k in ("Server Compute Input", "Server Compute Infer",
                                                          "Server Compute Output")) / 1e3,
        "window_ms": window_ms,
        "stdout_tail": done.stdout.strip().splitlines()[-12:],
    }


def run_patcher(url: str, model: str, batch: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    """One measurement with patcher's load generator at the same setting."""
    from patcher.triton.client import connect

    client = connect(url)
    try:
        target = inspect_target(client, url, model)
        request = payload(target, batch)
        warm_up(url, request, concurrency, max(4, 2 * concurrency))
        before = server_stats.snapshot(client, model)
        load = run_load(url, request, Load(concurrency=concurrency, duration_s=duration_s, max_requests=10**7))
        delta = server_stats.delta(before, server_stats.settled_snapshot(client, model, before, load.succeeded))
    finally:
        client.close()
    setting = Setting(model=model, kind=target.kind, runtime="triton", input_kind="inline", batch_size=batch,
                      concurrency=concurrency)
    row = result_row(setting, load, delta)
    return {"throughput": row["throughput"], "latency_ms": row["latency_ms"], "server_queue_ms": delta["queue_ms"],
            "server_compute_ms": delta["compute_ms"], "requests": row["requests"], "consistent": row["consistent"]}


def _pooled(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each figure over the rounds."""
    keys = ("throughput", "server_queue_ms", "server_compute_ms")
    pooled = {key: round(sum(s[key] for s in samples) / len(samples), 4) for key in keys}
    pooled["latency_ms"] = {
        key: round(sum(s["latency_ms"][key] for s in samples) / len(samples), 4) for key in ("p50", "p90", "p99")
    }
    return pooled


def compare(patcher: dict[str, Any], analyzer: dict[str, Any]) -> dict[str, Any]:
    """patcher / perf_analyzer for throughput and each latency percentile, and whether each is within 10%."""
    ratios = {"throughput": patcher["throughput"] / analyzer["throughput"]}
    for key in ("p50", "p90", "p99"):
        ratios[f"latency_{key}"] = patcher["latency_ms"][key] / analyzer["latency_ms"][key]
    return {key: {"ratio": round(value, 4), "within_10pct": abs(value - 1) <= TOLERANCE}
            for key, value in ratios.items()}


def crosscheck(url: str, model: str, batch: int, concurrency: int, duration_s: float, rounds: int,
               workdir: Path) -> dict[str, Any]:
    """Alternate patcher and perf_analyzer (ABBA) at one setting; the pooled figures of each and their ratios."""
    binary, env = ensure_perf_analyzer()
    samples: dict[str, list[dict[str, Any]]] = {"patcher": [], "perf_analyzer": []}
    for index in range(rounds):
        order = ["patcher", "perf_analyzer"] if index % 2 == 0 else ["perf_analyzer", "patcher"]
        for tool in order:
            if tool == "patcher":
                samples[tool].append(run_patcher(url, model, batch, concurrency, duration_s))
            else:
                samples[tool].append(run_perf_analyzer(binary, env, url, model, batch, concurrency, duration_s,
                                                       workdir))
            print(f"round {index + 1} {tool}: {samples[tool][-1]['throughput']:.0f} img/s, "
                  f"p99 {samples[tool][-1]['latency_ms']['p99']:.2f} ms", flush=True)
    pooled = {tool: _pooled(values) for tool, values in samples.items()}
    return {"pooled": pooled, "ratios": compare(pooled["patcher"], pooled["perf_analyzer"]), "samples": samples}


def markdown(record: dict[str, Any]) -> str:
    """The cross-check as Markdown."""
    setting = record["setting"]
    pooled, ratios = record["result"]["pooled"], record["result"]["ratios"]
    lines = [
        f"# patcher bench against perf_analyzer {VERSION}: {record['name']}",
        "",
        f"{record['created']}, {record['machine']['cpu']} ({record['machine']['usable_cores']} usable cores), "
        f"load average {record['machine']['load_average_start']} -> {record['load_average_end']}.",
        f"Model `{setting['model']}`, batch {setting['batch']}, concurrency {setting['concurrency']}, "
        f"{setting['duration_s']} s per measurement, {setting['rounds']} rounds alternating ABBA; both tools use "
        "synchronous gRPC calls from one thread per concurrency slot, inputs inline.",
        "",
        "| figure | patcher | perf_analyzer | patcher / perf_analyzer | within 10% |",
        "|---|---|---|---|---|",
        f"| throughput (img/s) | {pooled['patcher']['throughput']:.1f} | {pooled['perf_analyzer']['throughput']:.1f} "
        f"| {ratios['throughput']['ratio']:.3f} | {'yes' if ratios['throughput']['within_10pct'] else '**no**'} |",
    ]
    for key in ("p50", "p90", "p99"):
        ratio = ratios[f"latency_{key}"]
        lines.append(f"| latency {key} (ms) | {pooled['patcher']['latency_ms'][key]:.3f} | "
                     f"{pooled['perf_analyzer']['latency_ms'][key]:.3f} | {ratio['ratio']:.3f} | "
                     f"{'yes' if ratio['within_10pct'] else '**no**'} |")
    lines += [
        f"| server queue (ms) | {pooled['patcher']['server_queue_ms']:.3f} | "
        f"{pooled['perf_analyzer']['server_queue_ms']:.3f} | | |",
        f"| server compute (ms) | {pooled['patcher']['server_compute_ms']:.3f} | "
        f"{pooled['perf_analyzer']['server_compute_ms']:.3f} | | |",
        "",
        "Per round (img/s): "
        + "; ".join(f"{tool} " + ", ".join(f"{s['throughput']:.0f}" for s in samples)
                    for tool, samples in record["result"]["samples"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", type=Path, help="a run directory to serve (else --url and --model)")
    parser.add_argument("--url", help="an already running server's gRPC host:port")
    parser.add_argument("--model", help="the served model (default with RUN: <name>_patched)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the served model")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", help="result file stem suffix (default: the run or model name)")
    args = parser.parse_args(argv)
    try:
        record = _main(args)
    except PatcherError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record["result"]["ratios"], indent=2))
    return 0


def _main(args: argparse.Namespace) -> dict[str, Any]:
    from patcher.runs.manifest import load_run
    from patcher.stages.bench import ensure_export
    from patcher.triton.repository.writer import RepositoryOptions, write_repository
    from patcher.triton.serving.server import TritonServer

    if args.run is None and (args.url is None or args.model is None):
        raise PatcherError("pass a run directory, or --url and --model of an already running server")
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="patcher-crosscheck-") as workdir:
        if args.run is not None:
            run = load_run(args.run)
            options = RepositoryOptions(max_batch_size=max(64, args.batch),
                                        max_queue_delay_us=DEFAULT_MAX_QUEUE_DELAY_US, intra_op_threads=args.threads)
            written = write_repository(ensure_export(run), Path(workdir) / "repo", options)
            model = args.model or f"{written.name}_patched"
            with TritonServer(Path(workdir) / "repo", models=[model]) as server:
                result = crosscheck(server.grpc_url, model, args.batch, args.concurrency, args.duration, args.rounds,
                                    Path(workdir))
            name = args.name or run.name
        else:
            model = args.model
            result = crosscheck(args.url, model, args.batch, args.concurrency, args.duration, args.rounds,
                                Path(workdir))
            name = args.name or model
    record = {
        "format": "patcher-perf-analyzer-crosscheck/1",
        "name": name,
        "created": now_iso(),
        "perf_analyzer": VERSION,
        "setting": {"model": model, "batch": args.batch, "concurrency": args.concurrency,
                    "duration_s": args.duration, "rounds": args.rounds},
        "machine": machine,
        "load_average_end": load_average(),
        "result": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"perf_analyzer_crosscheck-{name}"
    write_json(Path(f"{stem}.json"), record)
    Path(f"{stem}.md").write_text(markdown(record))
    print(f"wrote {stem}.json and {stem}.md")
    return record


if __name__ == "__main__":
    raise SystemExit(main())
