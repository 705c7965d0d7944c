"""The offline demo: PAINT in miniature on real images, from pretraining to gRPC answers and a benchmark.

A mini CLIP pretrained here on Fashion-MNIST and the digits 0-4 is patched on all ten digits while
Fashion-MNIST is protected, then exported, served by a real Triton server and queried over gRPC.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from patcher.runs.manifest import load_run
from patcher.runs.report import accuracy_table, alpha_lines, markdown_table
from patcher.runs.store import write_json
from patcher.stages.build import BuildOptions, build
from patcher.stages.pretrain import RECORD_FILENAME, PretrainOptions, pretrain, reference_dir
from patcher.training.loop import TrainConfig

console = Console()


@dataclass
class DemoOptions:
    """Where the demo writes, and how much of the pipeline it runs."""

    runs_dir: Path = Path("runs")
    repo: Path = Path("triton_models")
    results_dir: Path = Path("bench/results")
    serve: bool = True
    bench: bool = True
    samples: int = 8
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=1e-4, weight_decay=0.1, warmup_steps=30,
                                            checkpoint_every=100)
    )


def reference_model() -> Path:
    """The cached offline reference mini CLIP, pretrained now if it is not there yet."""
    options = PretrainOptions()
    folder = reference_dir(options)
    if (folder / RECORD_FILENAME).is_file():
        console.print(f"reference mini CLIP: {folder} (cached)")
        return folder
    console.print("pretraining the reference mini CLIP (once; cached afterwards)")
    return pretrain(options)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Pretrain (or reuse) the mini CLIP, patch digits protecting Fashion-MNIST, export, serve, classify, bench."""
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    model_dir = reference_model()
    summary["reference_model"] = json.loads((model_dir / RECORD_FILENAME).read_text())

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_path = build(BuildOptions(
        task="digits", support=["fashion-mnist"], model=f"local-dir:{model_dir}", pretrained=None, alpha="auto",
        finetune=options.finetune, out=options.runs_dir / f"demo-digits-{stamp}",
    ))
    run = load_run(run_path)
    manifest = run.manifest
    console.print(accuracy_table(manifest))
    for line in alpha_lines(manifest):
        console.print(line)
    summary["run"] = {"path": str(run_path), "test_accuracy": manifest["test_accuracy"], "alpha": manifest["alpha"],
                      "timings_s": run.timings.get("timings_s")}

    from patcher.export import EXPORT_JSON, export_run

    export_dir = export_run(run_path, fp16=True)
    export_record = json.loads((export_dir / EXPORT_JSON).read_text())
    summary["export"] = {"models": export_record["models"], "timings_s": export_record.get("timings_s")}
    console.print(f"exported: {export_dir}")

    if options.serve:
        summary["serving"] = _serve_and_classify(export_dir, options)
    if options.bench:
        from patcher.bench import bench_run

        summary["bench"] = bench_run(run_path, out_dir=options.results_dir, name="demo")["summary"]
    summary["total_s"] = round(time.perf_counter() - started, 1)
    _write_results(summary, manifest, options.results_dir)
    shutil.copyfile(run_path / "alpha_curve.png", options.results_dir / "demo-alpha-curve.png")
    return summary


def _serve_and_classify(export_dir: Path, options: DemoOptions) -> dict[str, Any]:
    from patcher.data.tasks import get_task
    from patcher.triton import TritonServer, classify_files, write_repository

    written = write_repository(export_dir, options.repo)
    console.print(written["message"])
    samples_dir = export_dir.parent / "samples"
    samples_dir.mkdir(exist_ok=True)
    test = get_task("digits").dataset("test")
    step = max(1, len(test) // options.samples)
    files, truth = [], []
    for number, index in enumerate(range(0, step * options.samples, step)):
        image, label = test[index]
        path = samples_dir / f"digit-{number}-label-{label}.png"
        image.save(path)
        files.append(path)
        truth.append(str(label))
    with TritonServer(options.repo, models=None) as server:
        console.print(f"Triton serving at {server.grpc_url} (gRPC)")
        results = classify_files(files, written["name"], url=server.grpc_url, top_k=1)
    rows = []
    for path, label, result in zip(files, truth, results, strict=True):
        predicted = result["tasks"]["digits"][0]["label"]
        rows.append({"file": path.name, "label": label, "predicted": predicted})
        console.print(f"  {path.name}: digits -> {predicted} (true {label})")
    correct = sum(row["label"] == row["predicted"] for row in rows)
    console.print(f"gRPC classification: {correct}/{len(rows)} correct")
    return {"model": written["name"], "classified": rows, "correct": correct}


def _write_results(summary: dict[str, Any], manifest: dict[str, Any], results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "demo.json", summary)
    reference = summary["reference_model"]
    lines = [
        "# Demo: PAINT in miniature (offline)",
        "",
        f"Reference mini CLIP ({reference['options']['model']}, {reference['options']['train']['steps']} steps, "
        f"{reference['timings_s']['train']:.0f} s): zero-shot test accuracy "
        + ", ".join(f"{task} {r['accuracy']:.2f}% (chance {r['chance']:.0f}%)"
                    for task, r in reference["zero_shot"].items()),
        "",
        markdown_table(manifest),
        "",
        *[f"- {line}" for line in alpha_lines(manifest)],
        "",
    ]
    (results_dir / "demo.md").write_text("\n".join(lines))
