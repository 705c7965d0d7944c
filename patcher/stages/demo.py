"""The offline demo: PAINT in miniature on real images, from the shipped model to gRPC answers and a benchmark.

The shipped reference CLIP (`patcher-reference`, committed in the repository) knows the names of the ten digits
from printed digits and has never seen handwriting; the demo patches scikit-learn's handwritten digits with
PAINT's `ft` while Fashion-MNIST, which the model already classifies, is protected; then it exports the run,
writes a Triton repository, serves it with the real tritonserver, classifies test images over gRPC and
benchmarks briefly. Everything it writes goes under its run folder (results/ there), unless results_dir says
where else (`patcher demo --results-dir bench/results` refreshes the committed figures).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from patcher.base.files import write_json, write_text
from patcher.base.records import to_json
from patcher.benchmark.machine import machine_info
from patcher.benchmark.sweep import SweepOptions
from patcher.data.options import DataOptions
from patcher.models.reference import REFERENCE_DIR, REFERENCE_NAME, provenance
from patcher.runs.manifest import Run, load_run
from patcher.runs.summary import accuracy_table, alpha_lines, markdown_table
from patcher.stages.build import BuildOptions, build
from patcher.training.config import TrainConfig

console = Console()


@dataclass
class DemoOptions:
    """Where the demo writes, how it fine-tunes, and how much of the pipeline it runs."""

    runs_dir: Path = Path("runs")
    results_dir: Path | None = None  # default: the run folder's results/
    serve: bool = True
    bench: bool = True
    samples: int = 20  # test images classified over gRPC
    train_config: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=1e-4, weight_decay=0.1, warmup_steps=30,
                                            checkpoint_every=100)
    )
    augment: bool = False
    bench_sweep: SweepOptions = field(default_factory=lambda: SweepOptions(
        concurrency=(1, 4), batch_sizes=(1, 16), duration_s=1.5, max_requests=2000, rounds=2))


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Patch digits on the shipped reference model protecting Fashion-MNIST, export, serve, classify, bench."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    record = provenance()
    console.print(f"reference model: {REFERENCE_NAME} ({record['architecture']}, state sha256 "
                  f"{record['state_sha256'][:12]}, shipped in {REFERENCE_DIR})")
    summary: dict[str, Any] = {"reference_model": {key: record[key] for key in (
        "architecture", "command", "commit", "state_sha256", "zero_shot")}}

    tick = time.perf_counter()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_path = build(BuildOptions(
        task="digits", support=["fashion-mnist"], model=REFERENCE_NAME, pretrained=None, alpha="auto",
        train_config=options.train_config, data=DataOptions(augment=options.augment),
        out=options.runs_dir / f"demo-digits-{stamp}",
    ))
    assert run_path is not None  # the demo runs on one process
    results_dir = options.results_dir or run_path / "results"
    run = load_run(run_path)
    timings["build"] = time.perf_counter() - tick
    console.print(accuracy_table(run.manifest))
    for line in alpha_lines(run.manifest):
        console.print(line)
    summary["run"] = {"path": str(run_path), "test_accuracy": run.manifest.test_accuracy,
                      "alpha": to_json(run.manifest.alpha), "timings_s": run.timings.get("timings_s")}

    from patcher.export.contract import EXPORT_JSON, read_export_record
    from patcher.stages.export import ExportOptions, export_run

    tick = time.perf_counter()
    export_dir = export_run(run_path, ExportOptions(fp16=True))
    timings["export"] = time.perf_counter() - tick
    export_record = read_export_record(export_dir / EXPORT_JSON)
    summary["export"] = {"models": to_json(export_record.models),
                         "parity": {key: {k: report[k] for k in ("max_abs_diff", "top1_agreement", "passed")}
                                    for key, report in export_record.parity["models"].items()}}
    console.print(f"exported: {export_dir}")

    if options.serve:
        tick = time.perf_counter()
        summary["serving"] = _serve_and_classify(export_dir, options)
        timings["serve_and_classify"] = time.perf_counter() - tick
    if options.bench:
        from patcher.benchmark.measure import BenchOptions
        from patcher.stages.bench import ServingOptions, bench_run

        tick = time.perf_counter()
        report = bench_run(run_path, BenchOptions(sweep=options.bench_sweep, out_dir=results_dir, name="demo-bench"),
                           ServingOptions(include_image_bytes=False))
        summary["bench"] = {"targets": report.targets, "report": str(results_dir / "demo-bench.md")}
        timings["bench"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    summary["timings_s"] = {key: round(value, 1) for key, value in timings.items()}
    summary["machine"] = machine_info()
    summary["results"] = str(results_dir / "demo.md")
    _write_results(summary, run, results_dir)
    console.print(f"summary: {results_dir / 'demo.md'}; alpha curve: {results_dir / 'demo-alpha-curve.png'}")
    return summary


def _serve_and_classify(export_dir: Path, options: DemoOptions) -> dict[str, Any]:
    """Write the export into the local repository, serve it, classify test images over gRPC; what was seen."""
    from patcher.data.tasks import get_task
    from patcher.triton.client import ClassifyOptions, Endpoint, classify_files
    from patcher.triton.repository.publish import DEFAULT_REPOSITORY
    from patcher.triton.repository.writer import write_repository
    from patcher.triton.serving.access import new_key
    from patcher.triton.serving.server import TritonServer

    written = write_repository(export_dir, DEFAULT_REPOSITORY)
    console.print(written.message)
    samples_dir = export_dir.parent / "samples"
    samples_dir.mkdir(exist_ok=True)
    test = get_task("digits").dataset("test")
    step = max(1, len(test) // options.samples)
    files, truth = [], []
    for number, index in enumerate(range(0, step * options.samples, step)):
        image, label = test[index]
        path = samples_dir / f"digit-{number:02d}-label-{label}.png"
        image.save(path)
        files.append(path)
        truth.append(str(label))
    with TritonServer(DEFAULT_REPOSITORY, models=list(written.models), key=new_key()) as server:
        console.print(f"Triton serving at {server.grpc_url} (gRPC), models {', '.join(written.models)}")
        results = classify_files(files, written.name, endpoint=Endpoint(url=server.grpc_url),
                                 options=ClassifyOptions(top_k=1))
    rows = []
    for path, label, result in zip(files, truth, results, strict=True):
        predicted = result["tasks"]["digits"][0]["label"]
        rows.append({"file": path.name, "label": label, "predicted": predicted})
    correct = sum(row["label"] == row["predicted"] for row in rows)
    shown = " ".join(f"{row['label']}->{row['predicted']}" for row in rows)
    console.print(f"gRPC classification of {len(rows)} digits test images (true->predicted): {shown}")
    console.print(f"gRPC classification: {correct}/{len(rows)} correct ({100.0 * correct / len(rows):.0f}%)")
    return {"model": written.name, "version": written.version, "classified": rows, "correct": correct,
            "total": len(rows)}


def _write_results(summary: dict[str, Any], run: Run, results_dir: Path) -> None:
    """bench/results/demo.json, demo.md (the summary table) and demo-alpha-curve.png."""
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "demo.json", summary)
    reference = summary["reference_model"]
    zero_shot = ", ".join(f"{task} {r['accuracy']:.2f}% (chance {r['chance']:.0f}%)"
                          for task, r in reference["zero_shot"].items() if task in ("digits", "fashion-mnist"))
    machine = summary["machine"]
    lines = [
        "# Demo: PAINT in miniature (offline)",
        "",
        f"Run {summary['run']['path']} on {machine['cpu']} ({machine['usable_cores']} usable cores, "
        f"{machine['memory_gib']} GiB), {datetime.now():%Y-%m-%d}.",
        "",
        f"Shipped reference model `patcher-reference` ({reference['architecture']}, state sha256 "
        f"{reference['state_sha256'][:12]}): zero-shot test accuracy {zero_shot}",
        "",
        "Test accuracy (%):",
        "",
        markdown_table(run.manifest),
        "",
        *[f"- {line}" for line in alpha_lines(run.manifest)],
    ]
    if "serving" in summary:
        serving = summary["serving"]
        lines += ["", f"gRPC classification through the served ensemble `{serving['model']}` (version "
                      f"{serving['version']}): {serving['correct']}/{serving['total']} digits test images correct."]
    lines += ["", "Time (s): " + ", ".join(f"{key} {value:.0f}" for key, value in summary["timings_s"].items()), ""]
    write_text(results_dir / "demo.md", "\n".join(lines))
    shutil.copyfile(run.path / "alpha_curve.png", results_dir / "demo-alpha-curve.png")
