"""The GPU check's report as Markdown (bench/gpu_check.py writes it beside the JSON)."""

from __future__ import annotations

import json
from typing import Any


def _machine(report: dict[str, Any]) -> list[str]:
    record = report["phases"].get("machine", {})
    host = record.get("host", {})
    lines = [f"- Device: **{report['device']}**"
             + (f", {record.get('gpu_memory_gib')} GiB, compute capability {record.get('capability')}, "
                f"{record.get('multiprocessors')} SMs, nvidia-smi (driver, max SM clock, power limit): "
                f"{record.get('nvidia_smi')}" if record.get("gpu") else " (CPU smoke run: the tiny model)"),
             f"- Host: {host.get('cpu')}, {host.get('usable_cores')} usable cores, {host.get('memory_gib')} GiB, "
             f"load average {host.get('load_average_start')}",
             f"- torch {record.get('torch')} (CUDA {record.get('torch_cuda')}); onnxruntime providers: "
             f"{', '.join(record.get('onnxruntime_providers', []))}",
             f"- Setup: {report['setup_s']:.0f} s" if report.get("setup_s") else "- Setup: none (the Python as it was)"]
    versions = host.get("versions", {})
    if versions:
        lines.append("- Versions: " + ", ".join(f"{name} {version}" for name, version in sorted(versions.items())))
    return lines


def _problem(name: str, record: dict[str, Any]) -> list[str]:
    if "skipped" in record:
        return [f"*Skipped: {record['skipped']}.*", ""]
    if "error" in record:
        return [f"**Error** after {record.get('seconds')} s: `{record['error'][:500]}`", "",
                "```", *record.get("traceback", []), "```", ""]
    return []


def _training(record: dict[str, Any]) -> list[str]:
    lines = ["| model | batch | configuration | precision | images/s | speed / plain | max_memory_allocated MiB "
             "| memory / plain |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for shape in record.get("shapes", []):
        for run in shape["runs"]:
            if "error" in run:
                lines.append(f"| {shape['model']} | {shape['batch']} | {run['config']} | | {run['error']} | | | |")
                continue
            lines.append(f"| {shape['model']} | {shape['batch']} | {run['config']} | {run['precision']} "
                         f"| {run['images_per_s']:,.1f} | {run.get('speed_vs_plain', '')} "
                         f"| {run.get('max_memory_allocated_mib', 'n/a')} | {run.get('memory_vs_plain', '')} |")
    return lines


def _rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key, row.get("error", "") if key == "images_per_s" else "")
            cells.append(f"{value:,.1f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _inference(record: dict[str, Any]) -> list[str]:
    rows = record.get("rows", [])
    torch_rate = {(r["model"], r["batch"]): r.get("images_per_s") for r in rows if r["kind"] == "torch fp32"}
    for row in rows:
        base = torch_rate.get((row["model"], row["batch"]))
        if base and row.get("images_per_s"):
            row["vs_torch"] = round(row["images_per_s"] / base, 3)
    columns = [("model", "model"), ("batch", "batch"), ("runner", "kind"), ("images/s", "images_per_s"),
               ("p50 ms", "p50_ms"), ("/ torch fp32", "vs_torch")]
    return [*_rows(rows, columns), "", *[f"- {note}" for note in record.get("notes", [])]]


def _triton(record: dict[str, Any]) -> list[str]:
    rows = [{**row, "p50_ms": (row.get("latency_ms") or {}).get("p50")} for row in record.get("rows", [])]
    columns = [("batch", "batch"), ("concurrency", "concurrency"), ("images/s", "images_per_s"), ("p50 ms", "p50_ms"),
               ("failed", "failed")]
    group = record.get("instance_group", {})
    return [f"Model `{record.get('model')}`, instance group {group.get('kind')} x {group.get('count')}.", "",
            *_rows(rows, columns), "",
            f"- GPU processes while serving: {json.dumps(record.get('server_gpu_processes'))}",
            f"- Instance lines of the server's log: {json.dumps(record.get('instance_log_lines'))}"]


def _pipeline(record: dict[str, Any]) -> list[str]:
    parity = record.get("parity_on_device", {})
    return [f"- `patcher build` {record.get('build_s')} s, `patcher export` {record.get('export_s')} s",
            f"- Chosen alpha {record.get('alpha')}; test accuracy {json.dumps(record.get('test_accuracy'))}",
            f"- Held-out evaluations during training: {json.dumps(record.get('held_out_evaluations'))[:600]}",
            f"- Parity of patched.onnx on this device (onnxruntime against PyTorch, float32 without TF32): "
            f"passed {parity.get('passed')}, max |diff| {parity.get('max_abs_diff')}, top-1 agreement "
            f"{parity.get('top1_agreement')}, problems {parity.get('problems')}, batch sizes "
            f"{parity.get('batch_sizes')}"]


SECTIONS = {
    "training": ("Fine-tuning through patcher's training loop (random weights, AdamW, `ft`)", _training),
    "evaluation": ("Held-out evaluation (patcher.data.evaluation.accuracies, batch 256)",
                   lambda r: _rows(r.get("runs", []), [("model", "model"), ("images", "images"),
                                                       ("images/s", "images_per_s")])),
    "build_export_parity": ("`patcher build` + `patcher export` on digits, parity on the device", _pipeline),
    "inference": ("In process: onnxruntime against PyTorch on the same device, host memory in and out", _inference),
    "triton": ("The bundled tritonserver (python backend, onnxruntime) with the export", _triton),
}


def markdown(report: dict[str, Any]) -> str:
    """Every figure of the check as a Markdown page."""
    kind = "CPU smoke run" if report["cpu_smoke"] else "GPU check"
    lines = [f"# {kind}: {report['device']}", "", f"Measured {report['measured']} by `bench/gpu_check.py`.", "",
             *_machine(report), ""]
    for name, (title, render) in SECTIONS.items():
        record = report["phases"].get(name, {"skipped": "not run"})
        lines += [f"## {title}", "", f"({record.get('seconds', 0)} s)", ""]
        problem = _problem(name, record)
        lines += problem if problem else [*render(record), ""]
    return "\n".join(lines) + "\n"
