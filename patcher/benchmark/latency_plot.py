"""The benchmark's PNG: throughput against p99 latency, one line per model (through its concurrency levels)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from patcher.benchmark.report import BenchReport

KIND_COLOURS = {"patched": "tab:blue", "zeroshot": "tab:orange", "outensemble": "tab:green",
                "patched-bytes": "tab:red"}
KIND_LABELS = {"patched-bytes": "image bytes, preprocess + patched"}
INPROCESS_MARKERS = {"onnxruntime": "s", "torch": "^"}


def latency_throughput_plot(report: BenchReport, path: Path) -> None:
    """One panel per batch size: each served model's (p99 latency, throughput) over concurrency; in-process as marks
    (square: onnxruntime, triangle: PyTorch eager), coloured by model kind."""
    rows = [r for r in report.results if r["throughput"] and r["latency_ms"]["p99"] is not None]
    batches = sorted({r["batch_size"] for r in rows}) or [1]
    width = max(5 * len(batches), 9)
    figure, axes_list = plt.subplots(1, len(batches), figsize=(width, 5.2), dpi=120, squeeze=False)
    for axes, batch in zip(axes_list[0], batches, strict=True):
        served = [r for r in rows if r["batch_size"] == batch and r["runtime"] == "triton"]
        for model in dict.fromkeys(r["model"] for r in served):
            points = sorted((r for r in served if r["model"] == model), key=lambda r: r["concurrency"])
            kind = points[0]["kind"]
            axes.plot(
                [r["latency_ms"]["p99"] for r in points],
                [r["throughput"] for r in points],
                marker="o",
                color=KIND_COLOURS.get(kind),
                label=f"{model} ({KIND_LABELS.get(kind, kind)}, Triton)",
            )
            for r in points:
                axes.annotate(str(r["concurrency"]), (r["latency_ms"]["p99"], r["throughput"]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        for r in (r for r in rows if r["batch_size"] == batch and r["runtime"] != "triton"):
            axes.scatter(r["latency_ms"]["p99"], r["throughput"], marker=INPROCESS_MARKERS.get(r["runtime"], "x"),
                         color=KIND_COLOURS.get(r["kind"]), label=f"{r['kind']} ({r['runtime']}, in-process)")
        axes.set_title(f"batch {batch}")
        axes.set_xlabel("p99 latency (ms)")
        axes.set_ylabel("throughput (images/s)")
        axes.grid(alpha=0.3)
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
    handles, labels = axes_list[0][-1].get_legend_handles_labels()
    for axes in axes_list[0][:-1]:
        more_handles, more_labels = axes.get_legend_handles_labels()
        for handle, label in zip(more_handles, more_labels, strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    columns = max(1, min(len(labels), 1 + len(batches)))
    legend_rows = -(-len(labels) // columns)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=7)
    figure.suptitle(f"patcher bench: {report.name} (numbers at points: concurrency)")
    figure.tight_layout(rect=(0, min(0.5, 0.03 + 0.045 * legend_rows), 1, 0.95))
    figure.savefig(path)
    plt.close(figure)
