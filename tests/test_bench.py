"""`patcher bench`: a real tritonserver, the tiny run, a second or two of load per setting; counts, never timings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faults_support import run_patcher
from triton_support import requires_bundled_triton

from patcher.base.errors import PatcherError
from patcher.benchmark import server_stats
from patcher.benchmark.loadgen import LoadResult, latency_summary
from patcher.benchmark.measure import BenchOptions
from patcher.benchmark.report import BenchReport, format_table
from patcher.benchmark.results import comparisons, targets
from patcher.benchmark.sweep import Budget, SweepOptions, make_sweep, round_order
from patcher.stages.bench import bench_run, bench_url
from patcher.triton.serving.ports import free_port

pytestmark = pytest.mark.slow
SWEEP = {"concurrency": [1, 3], "batch_sizes": [1, 4], "duration_s": 0.4, "max_requests": 60}


needs_server = requires_bundled_triton()


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny run, copied: bench exports it into RUN/onnx."""
    run = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.fixture(scope="module")
def report(run_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> BenchReport:
    out = tmp_path_factory.mktemp("bench-results")
    return bench_run(run_copy, BenchOptions(sweep=SweepOptions(**SWEEP), out_dir=out, name="tiny-bench"))


def _check_counts(row: dict[str, Any], max_requests: int) -> None:
    requests = row["requests"]
    assert requests["sent"] == requests["succeeded"] + requests["failed"], row["model"]
    assert requests["failed"] == 0 and not row["errors"], row["errors"]
    assert 0 < requests["sent"] <= max_requests
    assert row["images"] == requests["succeeded"] * row["batch_size"]
    latency = row["latency_ms"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert row["throughput"] > 0 and row["elapsed_s"] > 0


# --- a run served by the benchmark itself ---------------------------------------------------------------------


@needs_server
def test_bench_run_writes_json_markdown_png(report: BenchReport) -> None:
    files = report.files
    assert {Path(p).suffix for p in files.values()} == {".json", ".md", ".png"}
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in files.values())
    assert Path(files["json"]).name == "tiny-bench.json"
    assert json.loads(Path(files["json"]).read_text()) == report.record()
    text = Path(files["markdown"]).read_text()
    assert "## Targets" in text and "digits_outensemble" in text and "tiny-bench.png" in text
    assert len(format_table(report).rows) == len(report.results)


@needs_server
def test_bench_run_covers_every_model_setting_and_baseline(report: BenchReport, run_copy: Path) -> None:
    served = [r for r in report.results if r["runtime"] == "triton"]
    kinds = {"patched", "zeroshot", "outensemble", "patched-bytes"}
    settings = {(b, c) for b in SWEEP["batch_sizes"] for c in SWEEP["concurrency"]}
    assert {(r["kind"], r["batch_size"], r["concurrency"]) for r in served} == {
        (k, b, c) for k in kinds for b, c in settings
    }
    assert {r["input"] for r in served if r["kind"] != "patched-bytes"} == {"inline"}
    local = [r for r in report.results if r["runtime"] != "triton"]
    assert {(r["runtime"], r["kind"], r["batch_size"]) for r in local} == {
        (rt, k, b) for rt in ("onnxruntime", "torch") for k in ("patched", "zeroshot", "outensemble")
        for b in SWEEP["batch_sizes"]
    }
    for row in report.results:
        _check_counts(row, SWEEP["max_requests"])
    from patcher.base.files import sha256_file

    assert report.run["manifest_sha256"] == sha256_file(run_copy / "manifest.json")  # the bytes benchmarked
    assert (run_copy / "onnx" / "export.json").is_file()  # exported on the way


@needs_server
def test_server_statistics_agree_with_the_client(report: BenchReport) -> None:
    for row in (r for r in report.results if r["runtime"] == "triton"):
        server = row["server"]
        assert row["consistent"], row
        assert server["requests_succeeded"] == row["requests"]["succeeded"]
        assert server["requests_failed"] == 0
        assert server["images"] == row["images"]
        if row["kind"] != "patched-bytes":  # an ensemble has no queue or compute of its own
            assert server["executions"] >= 1 and server["queue_ms"] is not None and server["compute_ms"] is not None
            assert sum(server["execution_batches"].values()) == server["executions"]
            assert sum(int(size) * n for size, n in server["execution_batches"].items()) == server["images"]
            assert server["mean_execution_batch"] >= row["batch_size"] - 1e-9


@needs_server
def test_flops_accuracy_machine_and_comparisons(report: BenchReport) -> None:
    per_image = report.flops["per_image"]
    assert per_image["patched"] == per_image["zeroshot"] > 0
    assert per_image["outensemble"] == 2 * per_image["patched"]
    assert report.flops["matmul"]["peak_gflops"] > 0
    machine = report.machine
    assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["memory_gib"] > 0
    assert {"torch", "onnxruntime", "tritonclient"} <= set(machine["versions"])
    accuracy = report.accuracy
    assert accuracy["task"] == "digits" and accuracy["images"] == accuracy["split_size"] > 0
    assert 0 <= accuracy["onnxruntime"]["outensemble"] <= 100
    assert accuracy["onnxruntime"]["patched"] == pytest.approx(accuracy["manifest"]["patched"], abs=0.5)
    assert report.accuracy_by_kind["patched-bytes"] == report.accuracy_by_kind["patched"]
    compared = report.comparisons
    assert len(compared["patched_vs_zeroshot"]) == len(compared["patched_vs_outensemble"]) == 4
    assert [c["batch_size"] for c in compared["triton_vs_onnxruntime"]] == SWEEP["batch_sizes"]
    assert [t["name"] for t in report.targets] == [
        "patched_vs_zeroshot", "patched_vs_outensemble", "triton_vs_onnxruntime"
    ]
    worst = max((c["throughput_ratio"] for c in compared["patched_vs_zeroshot"]), key=lambda r: abs(r - 1))
    lowest = min(c["throughput_ratio"] for c in compared["patched_vs_outensemble"])
    best = max(compared["triton_vs_onnxruntime"], key=lambda c: c["triton"])
    assert [t["met"] for t in report.targets] == [abs(worst - 1) <= 0.03, lowest >= 1.8, best["ratio"] >= 0.8]
    assert [t["worst"] for t in report.targets] == [worst, lowest, best["ratio"]]


# --- an already running server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(run_copy: Path, report: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    from patcher.triton.repository.writer import RepositoryOptions, write_repository
    from patcher.triton.serving.server import TritonServer

    repo = tmp_path_factory.mktemp("bench-repo")
    write_repository(run_copy / "onnx", repo, RepositoryOptions(max_batch_size=8))
    with TritonServer(repo, models=["digits_patched", "digits_zeroshot"]) as running:
        yield running


@needs_server
def test_bench_url_with_shared_memory(server, tmp_path: Path) -> None:
    from patcher.triton.serving.access import write_key_file

    options = BenchOptions(out_dir=tmp_path, sweep=SweepOptions(concurrency=[2], batch_sizes=[8], duration_s=0.4,
                                                                max_requests=30, shared_memory=True))
    with pytest.raises(PatcherError, match=r"refused system shared memory.*restricted.*--key-file"):
        bench_url(server.grpc_url, ["digits_patched", "digits_zeroshot"], options)  # registering needs the key
    key_file = write_key_file(server.key, tmp_path / "keys" / "server.key.json", {"grpc": server.grpc_url}).path
    result = bench_url(server.grpc_url, ["digits_patched", "digits_zeroshot"], options, key_file=key_file)
    assert result.run is None and result.server["started_here"] is False
    assert result.name == "digits_patched" and (tmp_path / "digits_patched.json").is_file()
    assert server.key.value not in (tmp_path / "digits_patched.json").read_text()  # the key stays out of reports
    assert result.server["models"]["digits_patched"]["max_batch_size"] == 8
    assert [r["input"] for r in result.results] == ["shm", "shm"]
    for row in result.results:
        _check_counts(row, 30)
        assert row["consistent"]
    assert len(result.comparisons["patched_vs_zeroshot"]) == 1
    assert result.targets[1]["met"] is None  # no output-space ensemble served: not measured
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith("patcher_bench_")]


@needs_server
def test_bad_input_is_one_clear_line(server, tmp_path: Path) -> None:
    unreachable = f"127.0.0.1:{free_port()}"
    def options(**sweep: Any) -> BenchOptions:
        return BenchOptions(sweep=SweepOptions(**sweep), out_dir=tmp_path)

    cases = [
        (lambda: bench_url(unreachable, ["digits_patched"], options(duration_s=0.1)),
         rf"no Triton server answers at {unreachable}"),
        (lambda: bench_url(server.grpc_url, ["nope"], options(duration_s=0.1)),
         r"no ready model 'nope'.*digits_patched"),
        (lambda: bench_url(server.grpc_url, ["digits_patched"], options(batch_sizes=[1, 32])),
         r"batch size 32 exceeds max_batch_size 8 of digits_patched.*--max-batch-size"),
        (lambda: bench_url(server.grpc_url, ["digits_patched"], options(concurrency=[])),
         "at least one concurrency"),
        (lambda: bench_run(tmp_path / "missing-run", options()), "not a directory"),
    ]
    for call, message in cases:
        with pytest.raises(PatcherError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # nothing written for a refused benchmark


@needs_server
def test_bench_fails_with_one_error_line_when_requests_fail(server, tmp_path: Path) -> None:
    """A python backend killed (SIGSEGV) on a server nobody heals: every request to that model fails."""
    import os
    import signal

    from patcher.triton.serving.processes import stub_processes

    (stub,) = [s for s in stub_processes(server.pgid) if s.model == "digits_zeroshot"]
    os.kill(stub.pid, signal.SIGSEGV)
    arguments = ["--url", server.grpc_url, "--models", "digits_patched,digits_zeroshot", "--concurrency", "1",
                 "--batch-sizes", "1", "--duration", "0.3", "--max-requests", "20", "--out", str(tmp_path / "out")]
    done = run_patcher("bench", *arguments, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "requests failed" in errors[0] and "digits_zeroshot" in errors[0] and "not healthy" in errors[0]
    assert "--tolerate-failures" in errors[0] and not (tmp_path / "out").exists()  # no report of the failures
    sweep = SweepOptions(concurrency=[1], batch_sizes=[1], duration_s=0.3, max_requests=20)
    tolerated = bench_url(server.grpc_url, ["digits_patched", "digits_zeroshot"],
                          BenchOptions(sweep=sweep, out_dir=tmp_path / "kept", tolerate_failures=True))
    requests = {row["model"]: row["requests"] for row in tolerated.results}
    assert requests["digits_zeroshot"]["failed"] == requests["digits_zeroshot"]["sent"] > 0
    assert requests["digits_patched"]["failed"] == 0 < requests["digits_patched"]["succeeded"]
    assert any("failed requests" in note for note in tolerated.notes)


# --- pure functions -------------------------------------------------------------------------------------------


def _snapshot(success: int, images: int, executions: int, batches: dict[int, int], ns: int) -> dict[str, Any]:
    snap = {f"{key}_{part}": 0 for key in server_stats.DURATIONS for part in ("count", "ns")}
    snap.update(success_count=success, success_ns=success * ns, queue_count=success, queue_ns=success * ns // 4,
                compute_infer_count=success, compute_infer_ns=success * ns // 2, inference_count=images,
                execution_count=executions, batches=batches)
    return snap


def test_statistics_deltas_and_merges() -> None:
    before = _snapshot(10, 40, 5, {8: 5}, 1_000_000)
    after = _snapshot(30, 120, 9, {8: 5, 16: 2, 24: 2}, 1_000_000)
    delta = server_stats.delta(before, after)
    assert delta["requests_succeeded"] == 20 and delta["images"] == 80 and delta["executions"] == 4
    assert delta["execution_batches"] == {"16": 2, "24": 2} and delta["mean_execution_batch"] == 20.0
    assert delta["request_ms"] == 1.0 and delta["queue_ms"] == 0.25 and delta["compute_ms"] == 0.5
    merged = server_stats.merge(delta, delta)
    assert merged["requests_succeeded"] == 40 and merged["execution_batches"] == {"16": 4, "24": 4}
    assert merged["queue_ms"] == 0.25


def test_load_results_pool_and_percentiles_are_ordered() -> None:
    first = LoadResult(sent=3, succeeded=2, failed=1, elapsed_s=1.0, latencies_s=np.array([0.001, 0.002]),
                       errors={"UNAVAILABLE: x": 1})
    second = LoadResult(sent=2, succeeded=2, failed=0, elapsed_s=0.5, latencies_s=np.array([0.003, 0.004]))
    pooled = first.merge(second)
    assert (pooled.sent, pooled.succeeded, pooled.failed, pooled.elapsed_s) == (5, 4, 1, 1.5)
    summary = latency_summary(np.random.default_rng(0).exponential(0.01, 1000))
    assert summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    assert latency_summary(np.empty(0))["p99"] is None
    assert round_order(["a", "b", "c"], 0) == ["a", "b", "c"] and round_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_targets_from_rows() -> None:
    def row(kind: str, runtime: str, batch: int, concurrency: int, throughput: float) -> dict[str, Any]:
        return {"kind": kind, "runtime": runtime, "batch_size": batch, "concurrency": concurrency,
                "throughput": throughput, "latency_ms": {"p99": 10.0}}

    rows = [row("patched", "triton", 8, 1, 100), row("patched", "triton", 8, 4, 200),
            row("zeroshot", "triton", 8, 1, 102), row("zeroshot", "triton", 8, 4, 198),
            row("outensemble", "triton", 8, 1, 50), row("outensemble", "triton", 8, 4, 120),
            row("patched", "onnxruntime", 8, 1, 220)]
    compared = comparisons(rows)
    assert [c["throughput_ratio"] for c in compared["patched_vs_zeroshot"]] == [pytest.approx(100 / 102, abs=1e-4),
                                                                               pytest.approx(200 / 198, abs=1e-4)]
    assert compared["triton_vs_onnxruntime"] == [
        {"batch_size": 8, "best_concurrency": 4, "triton": 200, "onnxruntime": 220,
         "ratio": pytest.approx(0.9091, abs=1e-4)}
    ]
    met = {t["name"]: t["met"] for t in targets(compared)}
    assert met == {"patched_vs_zeroshot": True, "patched_vs_outensemble": False, "triton_vs_onnxruntime": True}


def test_request_budgets_and_windows() -> None:
    for total, windows in [(50, 4), (1, 4), (7, 3), (2000, 10)]:
        budget, spent = Budget(total, windows), []
        for _ in range(windows):
            spent.append(budget.next_window())
            budget.spend(spent[-1])
        assert sum(spent) == total and max(spent) - min(spent) <= max(1, total)
    sweep = make_sweep([1, 4], [8], 5.0, 2000, False)
    assert sweep.rounds == 10 and sweep.rounds_for(0.001) == 10
    assert sweep.rounds_for(0.4) == 2 and sweep.rounds_for(0.2) == 4  # windows of >= 5 latencies
    assert make_sweep([1], [1], 5.0, 10, False, rounds=3).rounds_for(1.0) == 3  # rounds given: kept
    with pytest.raises(PatcherError, match="at least 1"):
        make_sweep([0, 2], [8], 5.0, 10, False)


def test_front_ratios_pair_each_round_with_the_direct_run_before_it() -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "bench" / "serving_front.py"
    spec = importlib.util.spec_from_file_location("serving_front", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = {"patcher | grpc | direct | m | tensor | batch 1": [{"images_per_s": 100.0}, {"images_per_s": 200.0}],
            "patcher | grpc | front | m | tensor | batch 1": [{"images_per_s": 50.0}, {"images_per_s": 180.0}],
            "patcher | http | front | m | tensor | batch 1": [{"images_per_s": 1.0}]}  # no direct: no ratio
    found = module.ratios(rows)
    assert list(found) == ["patcher | grpc | front | m | tensor | batch 1"]
    assert found["patcher | grpc | front | m | tensor | batch 1"] == {"median": 0.7, "min": 0.5, "max": 0.9,
                                                                     "rounds": 2}
