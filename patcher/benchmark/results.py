"""One benchmark row from a measurement, and the comparisons and targets computed from the rows."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from patcher.benchmark.defaults import INT8_KIND
from patcher.benchmark.flops import achieved_gflops
from patcher.benchmark.loadgen import LoadResult, latency_summary

FORMAT = "patcher-bench/1"
TARGETS = {
    "patched_vs_zeroshot": "patched / zero-shot throughput within 3% at every setting",
    "patched_vs_outensemble": "patched / output-space ensemble throughput >= 1.8 at every setting",
    "int8_vs_patched": "int8 / float32 patched throughput >= 2 at every setting (aim on CPUs with VNNI or AMX)",
    "triton_vs_onnxruntime": "Triton at its best setting >= 0.8x in-process onnxruntime at the same batch size",
}


@dataclass(frozen=True, kw_only=True)
class Setting:
    """What one row measured: the model, its kind and runtime, how inputs travelled, batch size and concurrency."""

    model: str
    kind: str
    runtime: str  # triton, onnxruntime or torch
    input_kind: str  # inline, shm, bytes or in-process
    batch_size: int
    concurrency: int


def result_row(setting: Setting, load: LoadResult, server: dict[str, Any] | None = None, flops: int | None = None,
               peak_gflops: float | None = None) -> dict[str, Any]:
    """A report row: counts, throughput, latency percentiles, the server's view, achieved GFLOP/s."""
    batch_size = setting.batch_size
    images = load.succeeded * batch_size
    throughput = round(load.rate * batch_size, 3) if load.rate else None
    latency = latency_summary(load.latencies_s)
    gflops = achieved_gflops(throughput, flops)
    row: dict[str, Any] = {
        "model": setting.model,
        "kind": setting.kind,
        "runtime": setting.runtime,
        "input": setting.input_kind,
        "batch_size": batch_size,
        "concurrency": setting.concurrency,
        "requests": {"sent": load.sent, "succeeded": load.succeeded, "failed": load.failed},
        "images": images,
        "elapsed_s": round(load.elapsed_s, 4),
        "window_s": round(load.window_s, 4),
        "images_in_window": round(load.in_window * batch_size, 3),
        "throughput": throughput,
        "latency_ms": latency,
        "gflops": gflops,
        "peak_fraction": round(gflops / peak_gflops, 4) if gflops and peak_gflops else None,
        "window_throughputs": [round(rate * batch_size, 3) for rate in load.window_rates],
        "errors": load.errors,
        "server": server,
    }
    if server is not None:
        row["consistent"] = server["requests_succeeded"] == load.succeeded and server["images"] == images
        if latency["mean"] is not None and server["request_ms"] is not None:
            row["client_overhead_ms"] = round(latency["mean"] - server["request_ms"], 4)
    return row


def _triton(rows: list[dict[str, Any]], kind: str) -> dict[tuple[int, int], dict[str, Any]]:
    return {
        (r["batch_size"], r["concurrency"]): r
        for r in rows
        if r["runtime"] == "triton" and r["kind"] == kind and r["throughput"]
    }


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
        14: 2.14, 16: 2.12, 18: 2.10, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00}


def t975(freedom: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%) for `freedom` degrees of freedom, from a small table."""
    fitting = [k for k in T975 if k <= freedom]
    return T975[max(fitting)] if fitting and freedom <= 60 else 1.96


def ratio_interval(first: list[float], second: list[float]) -> list[float] | None:
    """95% interval of mean(first) / mean(second) from per-window throughputs (delta method on the log ratio,
    Student's t with the windows' degrees of freedom)."""
    if len(first) < 2 or len(second) < 2:
        return None
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.mean() <= 0 or b.mean() <= 0:
        return None
    error = float(np.sqrt(a.var(ddof=1) / len(a) / a.mean() ** 2 + b.var(ddof=1) / len(b) / b.mean() ** 2))
    ratio = float(a.mean() / b.mean())
    quantile = t975(len(a) + len(b) - 2)
    return [round(ratio * math.exp(-quantile * error), 4), round(ratio * math.exp(quantile * error), 4)]


def ratios(rows: list[dict[str, Any]], numerator: str, denominator: str) -> list[dict[str, Any]]:
    """Throughput and p99 ratios of two kinds served by Triton at every setting both were measured at, with the
    throughput ratio's 95% interval over the interleaved measurement windows."""
    first, second = _triton(rows, numerator), _triton(rows, denominator)
    out = []
    for key in sorted(first.keys() & second.keys()):
        a, b = first[key], second[key]
        p99a, p99b = a["latency_ms"]["p99"], b["latency_ms"]["p99"]
        out.append(
            {
                "batch_size": key[0],
                "concurrency": key[1],
                "throughput_ratio": round(a["throughput"] / b["throughput"], 4),
                "ci95": ratio_interval(a.get("window_throughputs", []), b.get("window_throughputs", [])),
                "p99_ratio": round(p99a / p99b, 4) if p99a and p99b else None,
            }
        )
    return out


def served_vs_inprocess(rows: list[dict[str, Any]], kind: str = "patched") -> list[dict[str, Any]]:
    """Per batch size: Triton's best throughput (over concurrency) against in-process onnxruntime's."""
    served = _triton(rows, kind)
    local = {
        r["batch_size"]: r for r in rows if r["runtime"] == "onnxruntime" and r["kind"] == kind and r["throughput"]
    }
    out = []
    for batch in sorted(local):
        candidates = [r for (b, _), r in served.items() if b == batch]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["throughput"])
        out.append(
            {
                "batch_size": batch,
                "best_concurrency": best["concurrency"],
                "triton": best["throughput"],
                "onnxruntime": local[batch]["throughput"],
                "ratio": round(best["throughput"] / local[batch]["throughput"], 4),
            }
        )
    return out


def comparisons(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Side-by-side ratios measured in this one run."""
    return {
        "patched_vs_zeroshot": ratios(rows, "patched", "zeroshot"),
        "patched_vs_outensemble": ratios(rows, "patched", "outensemble"),
        "int8_vs_patched": ratios(rows, INT8_KIND, "patched"),
        "triton_vs_onnxruntime": served_vs_inprocess(rows),
    }


def targets(compared: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each target with the figure measured against it and whether it is met (None: not measured)."""
    out = []
    same = compared["patched_vs_zeroshot"]
    zs = [c["throughput_ratio"] for c in same]
    worst = max(zs, key=lambda r: abs(r - 1.0)) if zs else None
    intervals = [c["ci95"] for c in same if c.get("ci95")]
    noise = ""
    if intervals:
        half = statistics.median((hi - lo) / 2 for lo, hi in intervals)
        holding = sum(lo <= 1.0 <= hi for lo, hi in intervals)
        noise = f"; 95% intervals +-{half:.3f} (median), {holding} of {len(intervals)} include 1.0"
    out.append(
        {
            "name": "patched_vs_zeroshot",
            "target": TARGETS["patched_vs_zeroshot"],
            "measured": f"ratio {min(zs):.3f} to {max(zs):.3f}, median {statistics.median(zs):.3f}{noise}"
            if zs
            else None,
            "worst": worst,
            "met": (abs(worst - 1.0) <= 0.03) if worst is not None else None,
            "intervals_including_1": sum(lo <= 1.0 <= hi for lo, hi in intervals) if intervals else None,
        }
    )
    ens = [c["throughput_ratio"] for c in compared["patched_vs_outensemble"]]
    out.append(
        {
            "name": "patched_vs_outensemble",
            "target": TARGETS["patched_vs_outensemble"],
            "measured": f"ratio {min(ens):.3f} to {max(ens):.3f}, median {statistics.median(ens):.3f}" if ens else None,
            "worst": min(ens) if ens else None,
            "met": (min(ens) >= 1.8) if ens else None,
        }
    )
    int8 = [c["throughput_ratio"] for c in compared.get("int8_vs_patched", [])]
    if int8:
        out.append({
            "name": "int8_vs_patched",
            "target": TARGETS["int8_vs_patched"],
            "measured": f"ratio {min(int8):.3f} to {max(int8):.3f}, median {statistics.median(int8):.3f}",
            "worst": min(int8),
            "met": min(int8) >= 2.0,
        })
    served = compared["triton_vs_onnxruntime"]
    best = max(served, key=lambda c: c["triton"]) if served else None
    out.append(
        {
            "name": "triton_vs_onnxruntime",
            "target": TARGETS["triton_vs_onnxruntime"],
            "measured": (
                f"{best['ratio']:.3f} (batch {best['batch_size']}, concurrency {best['best_concurrency']}: "
                f"{best['triton']:.0f} vs {best['onnxruntime']:.0f} img/s)"
            )
            if best
            else None,
            "worst": best["ratio"] if best else None,
            "met": (best["ratio"] >= 0.8) if best else None,
        }
    )
    return out
