"""Triton's statistics API: cumulative per-model counters before and after a measurement, and their difference."""

from __future__ import annotations

import time
from typing import Any

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def snapshot(client: Any, model: str) -> dict[str, Any]:
    """The model's cumulative counters (summed over its versions): counts and nanoseconds, batch histogram."""
    response = client.get_inference_statistics(model_name=model, as_json=False)
    totals: dict[str, Any] = {f"{key}_{part}": 0 for key in DURATIONS for part in ("count", "ns")}
    totals.update(inference_count=0, execution_count=0, batches={})
    for stats in response.model_stats:
        if stats.name != model:
            continue
        totals["inference_count"] += stats.inference_count
        totals["execution_count"] += stats.execution_count
        for key in DURATIONS:
            duration = getattr(stats.inference_stats, key)
            totals[f"{key}_count"] += duration.count
            totals[f"{key}_ns"] += duration.ns
        for batch in stats.batch_stats:
            totals["batches"][batch.batch_size] = totals["batches"].get(batch.batch_size, 0) + batch.compute_infer.count
    return totals


def settled_snapshot(
    client: Any, model: str, before: dict[str, Any], requests: int, timeout_s: float = 2.0
) -> dict[str, Any]:
    """A snapshot taken once the server has counted `requests` more successes than `before` (or after timeout_s).

    Triton records a request's statistics when it releases the request, just after sending the response,
    so a snapshot taken the moment the client has its last answer can miss the last request or two.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        after = snapshot(client, model)
        if after["success_count"] - before["success_count"] >= requests or time.monotonic() > deadline:
            return after
        time.sleep(0.002)


def _mean_ms(ns: int, count: int) -> float | None:
    return round(ns / count / 1e6, 4) if count else None


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server did between two snapshots: requests, images, executions, mean queue and compute times."""
    diff = {key: after[key] - before[key] for key in after if key != "batches"}
    batches = {
        size: count - before["batches"].get(size, 0)
        for size, count in sorted(after["batches"].items())
        if count - before["batches"].get(size, 0)
    }
    requests = diff["success_count"]
    compute_ns = diff["compute_input_ns"] + diff["compute_infer_ns"] + diff["compute_output_ns"]
    return {
        "requests_succeeded": requests,
        "requests_failed": diff["fail_count"],
        "images": diff["inference_count"],
        "executions": diff["execution_count"],
        "mean_execution_batch": round(diff["inference_count"] / diff["execution_count"], 3)
        if diff["execution_count"]
        else None,
        "request_ms": _mean_ms(diff["success_ns"], requests),
        "queue_ms": _mean_ms(diff["queue_ns"], diff["queue_count"]),
        "compute_input_ms": _mean_ms(diff["compute_input_ns"], diff["compute_input_count"]),
        "compute_infer_ms": _mean_ms(diff["compute_infer_ns"], diff["compute_infer_count"]),
        "compute_output_ms": _mean_ms(diff["compute_output_ns"], diff["compute_output_count"]),
        "compute_ms": _mean_ms(compute_ns, diff["compute_infer_count"]),
        "execution_batches": {str(size): count for size, count in batches.items()},
    }


def merge(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """Two deltas of the same setting (measured in separate rounds) as one: counts add, means are re-weighted."""
    if first is None:
        return second
    merged = dict(first)
    for key in ("requests_succeeded", "requests_failed", "images", "executions"):
        merged[key] = first[key] + second[key]
    for key in ("request_ms", "queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms", "compute_ms"):
        values = [(d[key], d["requests_succeeded"]) for d in (first, second) if d[key] is not None]
        total = sum(w for _, w in values)
        merged[key] = round(sum(v * w for v, w in values) / total, 4) if total else None
    merged["mean_execution_batch"] = round(merged["images"] / merged["executions"], 3) if merged["executions"] else None
    batches = dict(first["execution_batches"])
    for size, count in second["execution_batches"].items():
        batches[size] = batches.get(size, 0) + count
    merged["execution_batches"] = dict(sorted(batches.items(), key=lambda item: int(item[0])))
    return merged
