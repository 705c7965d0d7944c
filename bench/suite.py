"""The miniature eight-task suite on the shipped reference model: zero-shot, fine-tuned and patched per task.

Each task of the `mini-8` suite is patched alone with the demo's settings (`ft`, 300 steps of 64, lr 1e-4) while
Fashion-MNIST is supported within 1 point (PAINT's rule, alpha chosen on held-out data), for each seed. Finished
runs under --runs-dir are reused, and they are the fine-tuned checkpoints bench/merging.py merges.

    .venv/bin/python bench/suite.py                          # seeds 0 1 2, runs under runs/suite
    .venv/bin/python bench/suite.py --seeds 0 --tasks digits,house-numbers

Writes bench/results/suite.{md,json,png}; the reading under the table comes from bench/suite_notes.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two busy cores: spinning OpenMP threads slow torch 10x

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.machine import machine_info
from patcher.data.tasks.suites import MINI_EIGHT, MINI_EIGHT_SUPPORT
from patcher.runs.manifest import load_run
from patcher.stages.build import BuildOptions, build
from patcher.stages.demo import DemoOptions

KINDS = ("zeroshot", "finetuned", "patched")


def build_one(task: str, seed: int, model: str, runs_dir: Path) -> tuple[Path, float | None]:
    """The run of `task` at `seed` (reused when finished) and its build time (None when reused)."""
    out = runs_dir / f"seed-{seed}" / task
    if (out / "manifest.json").is_file():
        return out, None
    tick = time.perf_counter()
    config = replace(DemoOptions().train_config, seed=seed)
    build(BuildOptions(task=task, support=[MINI_EIGHT_SUPPORT], model=model, pretrained=None, alpha="auto",
                       train_config=config, device="cpu", out=out))
    return out, time.perf_counter() - tick


def run_row(path: Path, seconds: float | None) -> dict[str, Any]:
    """One run's test accuracies (patch task and support), chosen alpha and build time."""
    manifest = load_run(path).manifest
    task = manifest.patch_tasks[0]
    accuracy = manifest.test_accuracy
    recorded = load_run(path).timings.get("timings_s", {}).get("total")
    return {"task": task, "alpha": manifest.alpha.chosen, "build_s": round(seconds or recorded or 0.0, 1),
            **{kind: round(accuracy[kind][task], 2) for kind in KINDS},
            "support": {kind: round(accuracy[kind][MINI_EIGHT_SUPPORT], 2) for kind in KINDS}}


def spread(values: list[float]) -> str:
    """Mean ± half the range, or the one value."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def markdown(rows: list[dict[str, Any]], seeds: list[int], model: str, machine: dict[str, Any]) -> str:
    """The suite table: per task, zero-shot / fine-tuned / patched, gains, support change, alpha, time."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    lines = [
        "# The miniature eight-task suite (`mini-8`) on the shipped reference model",
        "",
        f"{now_iso()[:10]}, {machine['cpu']} ({machine['usable_cores']} usable cores, {machine['memory_gib']} GiB), "
        f"model `{model}`, seeds {', '.join(map(str, seeds))} (mean ± half the range). Each task patched alone with "
        f"the demo's `ft` (300 steps of 64, lr 1e-4), {MINI_EIGHT_SUPPORT} supported within 1 point (PAINT's rule, "
        "alpha on held-out data). Test accuracy (%).",
        "",
        "| task | zero-shot | fine-tuned | patched | patched - zero-shot | ft - zero-shot | "
        f"{MINI_EIGHT_SUPPORT} change | alpha | build (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        mine = [row for row in rows if row["task"] == task]
        column = {kind: [row[kind] for row in mine] for kind in KINDS}
        gain = [row["patched"] - row["zeroshot"] for row in mine]
        headroom = [row["finetuned"] - row["zeroshot"] for row in mine]
        support = [row["support"]["patched"] - row["support"]["zeroshot"] for row in mine]
        alphas = "/".join(f"{row['alpha']:g}" for row in mine)
        lines.append(f"| {task} | {spread(column['zeroshot'])} | {spread(column['finetuned'])} | "
                     f"{spread(column['patched'])} | {spread(gain)} | {spread(headroom)} | {spread(support)} | "
                     f"{alphas} | {spread([row['build_s'] for row in mine])} |")
    means = {kind: statistics.fmean(row[kind] for row in rows) for kind in KINDS}
    lines += ["", f"Mean over tasks and seeds: zero-shot {means['zeroshot']:.2f}, fine-tuned "
                  f"{means['finetuned']:.2f}, patched {means['patched']:.2f}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars per task: zero-shot, fine-tuned and patched test accuracy (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    figure, axes = plt.subplots(figsize=(10, 4))
    for offset, kind in enumerate(KINDS):
        means = [statistics.fmean(row[kind] for row in rows if row["task"] == task) for task in tasks]
        axes.bar([i + (offset - 1) * 0.27 for i in range(len(tasks))], means, width=0.27, label=kind)
    axes.set_xticks(range(len(tasks)), tasks, rotation=25, ha="right")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("mini-8 on patcher-reference: each task patched alone, fashion-mnist within 1 point")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    """Build (or reuse) every task's run for every seed; write the suite's table, JSON and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", default=",".join(MINI_EIGHT))
    parser.add_argument("--model", default="patcher-reference")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/suite"))
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--notes", type=Path, default=Path(__file__).parent / "suite_notes.md",
                        help="the reading of the table, appended to suite.md")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for task in args.tasks.split(","):
            path, seconds = build_one(task, seed, args.model, args.runs_dir)
            rows.append({"seed": seed, **run_row(path, seconds)})
            print(f"seed {seed} {task}: {rows[-1]}", flush=True)
    machine = machine_info()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.results_dir / "suite.json", {"created": now_iso(), "model": args.model, "seeds": args.seeds,
                                                 "machine": machine, "runs": rows})
    notes = "\n" + args.notes.read_text() if args.notes and args.notes.is_file() else ""
    write_text(args.results_dir / "suite.md", markdown(rows, args.seeds, args.model, machine) + notes)
    plot(rows, args.results_dir / "suite.png")


if __name__ == "__main__":
    main()
