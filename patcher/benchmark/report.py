"""A benchmark report: its typed record (`BenchReport`), and it as a terminal table, Markdown and JSON files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from patcher.base.files import write_json, write_text


@dataclass(kw_only=True)
class BenchReport:
    """One `patcher bench` report (patcher-bench/1, the JSON file's top level in this order): the run and server
    measured, the settings and machine, FLOPs and accuracy, every result row, the comparisons and targets computed
    from the rows, notes, and the files it was written to."""

    format: str
    name: str
    created: str
    run: dict[str, Any] | None
    server: dict[str, Any]
    settings: dict[str, Any]
    machine: dict[str, Any]
    flops: dict[str, Any]
    accuracy: dict[str, Any] | None
    accuracy_by_kind: dict[str, float | None]
    results: list[dict[str, Any]]
    comparisons: dict[str, Any]
    targets: list[dict[str, Any]]
    notes: list[str]
    files: dict[str, str] = field(default_factory=dict)  # json, markdown (and png) paths, once written

    def record(self) -> dict[str, Any]:
        """The JSON object, numpy scalars made plain."""
        return plain(asdict(self))


RUNTIME_LABEL = {"triton": "Triton gRPC", "onnxruntime": "onnxruntime", "torch": "PyTorch eager"}


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _accuracy(report: BenchReport, kind: str) -> float | None:
    return report.accuracy_by_kind.get(kind)


COLUMNS = [
    "model",
    "runtime",
    "input",
    "batch",
    "conc",
    "img/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "queue ms",
    "compute ms",
    "srv batch",
    "GFLOP/s",
    "of peak",
    "acc %",
]


def row_cells(report: BenchReport, row: dict[str, Any]) -> list[str]:
    """The table cells of one result row."""
    latency, server = row["latency_ms"], row.get("server") or {}
    return [
        row["model"],
        RUNTIME_LABEL.get(row["runtime"], row["runtime"]),
        row["input"],
        str(row["batch_size"]),
        str(row["concurrency"]),
        _num(row["throughput"], 0),
        _num(latency["p50"], 2),
        _num(latency["p90"], 2),
        _num(latency["p99"], 2),
        _num(server.get("queue_ms"), 2),
        _num(server.get("compute_ms"), 2),
        _num(server.get("mean_execution_batch"), 1),
        _num(row["gflops"], 2),
        _pct(row["peak_fraction"]),
        _num(_accuracy(report, row["kind"]), 2),
    ]


def format_table(report: BenchReport) -> Table:
    """Every measured row (served and in-process) as a rich Table for the terminal."""
    peak = report.flops.get("matmul", {}).get("peak_gflops")
    title = f"patcher bench: {report.name}"
    caption = f"matmul peak {peak} GFLOP/s; queue/compute: Triton statistics per request" if peak else None
    table = Table(title=title, caption=caption)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "runtime", "input") else "right")
    for row in report.results:
        table.add_row(*row_cells(report, row))
    return table


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _interval(interval: list[float] | None) -> str:
    return "-" if not interval else f"{interval[0]:.3f} to {interval[1]:.3f}"


def _server_line(report: BenchReport) -> str:
    """How the served classifiers ran: backend, instances, batching delay, threads (and how they were chosen)."""
    server = report.server
    models = [m for m in server.get("models", {}).values() if m.get("kind") != "patched-bytes"]
    if not models:
        return ""
    first = models[0]
    batching = first.get("dynamic_batching") or {}
    line = (f"Served classifiers: {first.get('backend')} backend, {first.get('instances')} instance(s), "
            f"max_batch_size {first.get('max_batch_size')}, dynamic batching delay "
            f"{batching.get('max_queue_delay_us', '-')} us, onnxruntime intra-op threads "
            f"{first.get('intra_op_threads') or 'default'}")
    calibration = server.get("threads_calibration") or {}
    if calibration.get("images_per_s"):
        rates = ", ".join(f"{t} thread(s) {r:,.0f} img/s" for t, r in calibration["images_per_s"].items())
        line += f" (auto: in-process onnxruntime at batch {calibration['batch']}: {rates})"
    return line + "."


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[value]


def markdown(report: BenchReport) -> str:
    """The report as Markdown: context, targets, accuracy and cost, every row, the side-by-side ratios."""
    lines = [f"# patcher bench: {report.name}", "", *_context_lines(report), "", "## Targets", ""]
    lines += _md_table(
        ["target", "measured (this run, side by side)", "met"],
        [[t["target"], t["measured"] or "-", _met(t["met"])] for t in report.targets],
    )
    lines += ["", "## Accuracy and cost", ""]
    header = ["model", "accuracy %", "GFLOP / image", "best img/s (Triton)", "at batch x conc", "p99 ms there"]
    lines += _md_table(header, _cost_rows(report))
    lines += _accuracy_lines(report)
    lines += ["", "## Every measurement", ""]
    lines += _md_table(COLUMNS, [row_cells(report, row) for row in report.results])
    lines += ["", "queue / compute ms: Triton's statistics, mean per request over the same window (deltas before and "
              "after); srv batch: images per model execution (dynamic batching); of peak: achieved GFLOP/s over "
              "the matmul peak."]
    lines += _comparison_lines(report.comparisons)
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    files = report.files
    if files.get("png"):
        lines += ["", f"![throughput against p99 latency]({Path(files['png']).name})"]
    return "\n".join(lines) + "\n"


def _context_lines(report: BenchReport) -> list[str]:
    """The run, machine, server, client and sweep the report measured."""
    machine, settings = report.machine, report.settings
    run = report.run or {}
    lines = []
    if run:
        lines.append(f"Run `{run['name']}` (manifest sha256 `{run['manifest_sha256'][:16]}`, alpha {run['alpha']}, "
                     f"model {run['model']}).")
    return [
        *lines,
        f"Created {report.created} on {machine['cpu']}: {machine['usable_cores']} usable cores "
        f"({machine['physical_cores']} physical), {machine['memory_gib']} GiB; load average "
        f"{machine['load_average_start']} at start, {machine.get('load_average_end')} at end.",
        f"Server: {report.server['url']} "
        f"({'started by the benchmark' if report.server['started_here'] else 'already running'}); "
        f"client: {settings['client']}.",
        f"Sweep: batch sizes {settings['batch_sizes']} x concurrency {settings['concurrency']}, "
        f"{settings['duration_s']} s and at most {settings['max_requests']} requests per model and setting, in "
        f"up to {settings['rounds']} windows ordered {settings['order']} so that drift cancels (fewer, longer ones "
        "where requests are slow); inputs "
        f"{'in system shared memory' if settings['shared_memory'] else 'inline in the gRPC request'}.",
        _server_line(report),
    ]


def _accuracy_lines(report: BenchReport) -> list[str]:
    """Where the accuracy figures come from, and the matmul peak the FLOP rates are measured against."""
    lines = []
    accuracy = report.accuracy or {}
    if accuracy:
        note = accuracy.get("error") or (
            f"{accuracy.get('images')} of {accuracy.get('split_size')} images of {accuracy['task']}/{accuracy['split']}"
        )
        lines += ["", f"Accuracy: {accuracy['task']} test split ({note}); manifest figures where the full split is "
                  "used, onnxruntime's otherwise (the output-space ensemble always)."]
    flops = report.flops
    if flops.get("matmul"):
        m = flops["matmul"]
        lines += [f"Peak: float32 torch.matmul {m['size']}x{m['size']} on {m['threads']} threads: "
                  f"{m['peak_gflops']} GFLOP/s (median {m['median_gflops']})."]
    return lines


def _comparison_lines(compared: dict[str, Any]) -> list[str]:
    """The side-by-side ratio tables the sweep measured."""
    lines = []
    for key, title in (("patched_vs_zeroshot", "Patched / zero-shot (same graph: ~1.0 expected)"),
                       ("patched_vs_outensemble", "Patched / output-space ensemble (one encoder pass against two)"),
                       ("int8_vs_patched", "int8 / float32 patched (same graph, dynamically quantised)")):
        if compared.get(key):
            lines += ["", f"## {title}", ""]
            lines += _md_table(["batch", "concurrency", "throughput ratio", "95% interval", "p99 ratio"],
                               [[str(c["batch_size"]), str(c["concurrency"]), f"{c['throughput_ratio']:.3f}",
                                 _interval(c.get("ci95")), _num(c["p99_ratio"], 3)] for c in compared[key]])
    if compared.get("triton_vs_onnxruntime"):
        lines += ["", "## Triton against in-process onnxruntime (patched)", ""]
        lines += _md_table(["batch", "best concurrency", "Triton img/s", "onnxruntime img/s", "ratio"],
                           [[str(c["batch_size"]), str(c["best_concurrency"]), _num(c["triton"], 0),
                             _num(c["onnxruntime"], 0), f"{c['ratio']:.3f}"]
                            for c in compared["triton_vs_onnxruntime"]])
    return lines


def _cost_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    per_image = report.flops.get("per_image", {})
    kinds = list(dict.fromkeys(r["kind"] for r in report.results))
    for kind in kinds:
        served = [r for r in report.results if r["kind"] == kind and r["runtime"] == "triton" and r["throughput"]]
        best = max(served, key=lambda r: r["throughput"]) if served else None
        flops = per_image.get(kind)
        rows.append([
            kind,
            _num(_accuracy(report, kind), 2),
            f"{flops / 1e9:.4f}" if flops else "-",
            _num(best["throughput"], 0) if best else "-",
            f"{best['batch_size']} x {best['concurrency']}" if best else "-",
            _num(best["latency_ms"]["p99"], 2) if best else "-",
        ])
    return rows


def plain(value: Any) -> Any:
    """`value` with numpy scalars and tuples turned into JSON's own types (recursively)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    return value


def write_report(report: BenchReport, out_dir: Path, png_writer: Any = None) -> dict[str, str]:
    """Write `<name>.json`, `<name>.md` and (with a writer) `<name>.png` into out_dir, noting them in `report.files`
    (its numpy scalars made plain too); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report.name
    files = {"json": str(out_dir / f"{stem}.json"), "markdown": str(out_dir / f"{stem}.md")}
    if png_writer is not None:
        files["png"] = str(out_dir / f"{stem}.png")
        png_writer(report, Path(files["png"]))
    report.files = files
    record = report.record()
    for key, value in record.items():
        setattr(report, key, value)
    write_json(Path(files["json"]), record)
    write_text(Path(files["markdown"]), markdown(report))
    return files
