"""Fine-tuning methods and multi-task patching on real offline data: PAINT's tables for the mini CLIP.

Scenario: the offline reference mini CLIP (pretrained on Fashion-MNIST and printed digits: it knows the ten
digit names, not handwriting) is patched on `digits` (scikit-learn's handwritten digits) and on
`digits-inverted` (the same digits dark on light, a folder: task generated here from digits' own train/test
parts), while `fashion-mnist` is supported. Every method fine-tunes with the demo's settings.

    .venv/bin/python bench/methods.py                 # model: the cached reference mini CLIP
    .venv/bin/python bench/methods.py --model local-dir:/path/to/model --seeds 0 1 2

Writes bench/results/methods.{md,json} (each method: zero-shot, fine-tuned and patched accuracy on the patch
and the supported task) and bench/results/multitask.{md,json} (each strategy against the single-task
specialists, and `patcher merge` of the specialists, which must equal the parallel strategy).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two busy cores: spinning OpenMP threads slow torch 10x

import argparse
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import ImageOps

from patcher.base.files import now_iso, write_json
from patcher.base.records import to_json
from patcher.benchmark.machine import machine_info
from patcher.data.options import DataOptions
from patcher.data.tasks import get_task, short_name
from patcher.runs.manifest import Run, load_run
from patcher.stages.build import BuildOptions, build
from patcher.stages.demo import DemoOptions
from patcher.stages.merge import MergeOptions, merge_runs
from patcher.training.config import TrainConfig
from patcher.training.methods import METHODS

KINDS = ("zeroshot", "finetuned", "patched")
SUPPORT = "fashion-mnist"
DEMO = DemoOptions()  # every method fine-tunes as the demo does


def make_inverted_digits(root: Path) -> str:
    """folder: task `digits-inverted`: every digit of digits' train and test parts, intensities inverted."""
    digits = get_task("digits")
    if (root / "classnames.txt").is_file():
        return f"folder:{root}"
    staging = root.with_name(f".{root.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for split in ("train", "test"):
        data = digits.dataset(split)
        for number in range(len(data)):
            image, label = data[number]
            folder = staging / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            ImageOps.invert(image).save(folder / f"{number:05d}.png")
    (staging / "templates.txt").write_text("\n".join(digits.templates) + "\n")
    (staging / "classnames.txt").write_text("".join(f"{label:02d}: {name}\n"  # class folder: class name
                                                    for label, name in enumerate(digits.classnames)))
    staging.rename(root)
    return f"folder:{root}"


# label -> (method, parameters, run folder): every method with its defaults, FLYP with the reference code's
# loss, and CAR-FT with CLIP's 80 ImageNet templates as contexts (digits has only three, near-identical ones)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    **{name: (name, {}, name) for name in METHODS},
    "flyp (reference loss)": ("flyp", {"same_class_positives": False}, "flyp-reference-loss"),
    "carft (ImageNet contexts)": ("carft", {"contexts": "imagenet"}, "carft-imagenet-contexts"),
}


def config_for(method: str, seed: int) -> TrainConfig:
    """The scenario's training config for one method: the demo's (300 steps of 64, lr 1e-4; PAINT's 2,000 steps
    at lr 1e-5 are for ViT-B/32); the probe keeps its own (lr 1e-3, no weight decay, on cached embeddings)."""
    if method == "lp":
        return TrainConfig(steps=2000, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_steps=0, seed=seed,
                           checkpoint_every=10_000)
    return replace(DEMO.train_config, seed=seed)


def run_build(model: str, task: str, out: Path, method: str, seed: int, multi: str | None = None,
              params: dict[str, Any] | None = None) -> Run:
    """Build (or reuse a finished) run."""
    if not (out / "manifest.json").is_file():
        config = config_for(method, seed)
        build(BuildOptions(task=task, support=[SUPPORT], model=model, pretrained=None, method=method,
                           method_params=params or {}, multi=multi, train_config=config,
                           data=DataOptions(augment=DEMO.augment), device="cpu", out=out))
    return load_run(out)


def summary(run: Run) -> dict[str, Any]:
    """Test accuracy by model and task, the alpha(s), the build time."""
    manifest = to_json(run.manifest)
    alpha = manifest["alpha"]
    return {
        "run": manifest["name"],
        "test_accuracy": manifest["test_accuracy"],
        "alpha": alpha["chosen"],
        "alpha_steps": [step["alpha"] for step in alpha.get("steps", [])],
        "seconds": run.timings.get("timings_s", {}).get("total"),
    }


def mean_std(values: list[float]) -> str:
    """'mean' or 'mean ± std' over seeds."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def machine_line(machine: dict[str, Any]) -> str:
    """Where the figures come from (build seconds depend on it; accuracies, being seeded, should not)."""
    return f"Measured {machine['created']} on {machine['cpu']} ({machine['usable_cores']} usable cores, no GPU)."


def methods_markdown(results: dict[str, list[dict[str, Any]]], model: str, seeds: list[int],
                     machine: dict[str, Any]) -> str:
    """PAINT's table per method: zero-shot, fine-tuned, patched on the patch and the supported task."""
    lines = [
        "# Fine-tuning methods, patched with PAINT's rule (offline mini CLIP)",
        "",
        f"Model `{model}`; patch task `digits` (handwritten; pretraining saw the names on printed digits), "
        f"supported `{SUPPORT}`, "
        f"tolerance 1 point, golden-section alpha search; test accuracy (%), seeds {seeds} (mean ± std).",
        machine_line(machine),
        "",
        "| method | digits zero-shot | digits fine-tuned | digits patched | fashion zero-shot | fashion fine-tuned "
        "| fashion patched | alpha | build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, runs in results.items():
        cells = [mean_std([r["test_accuracy"][kind][task] for r in runs]) for task in ("digits", SUPPORT)
                 for kind in KINDS]
        alphas = ", ".join(f"{r['alpha']:g}" for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {method} | {' | '.join(cells)} | {alphas} | {seconds:.0f} |")
    described = "; ".join(f"`{name}`: {cls.summary} ({cls.reference})" for name, cls in METHODS.items())
    lines += ["", f"Methods: {described}. `flyp (reference loss)`: FLYP with the reference code's identity "
              "target, which treats same-class pairs in a batch as negatives. `carft (ImageNet contexts)`: the KL "
              "over CLIP's 80 ImageNet templates instead of the task's own three.", ""]
    return "\n".join(lines)


def multitask_markdown(sections: dict[str, dict[str, Any]], tasks: dict[str, str], model: str,
                       machine: dict[str, Any]) -> str:
    """Per method: accuracy per task and mean over patch tasks for each strategy and the single-task specialists."""
    patch = [name for name, label in tasks.items() if label != SUPPORT]
    lines = [
        "# Multi-task patching (offline mini CLIP)",
        "",
        machine_line(machine),
        "",
        f"Model `{model}`; patch tasks `digits` and `digits-inverted` (digits printed dark on light), supported "
        f"`{SUPPORT}` (tolerance 1 point). Test accuracy (%) of each patched model; the mean is over the patch tasks.",
        "Specialists: one single-task run per patch task with the same method (its own patched model); "
        "`merge` is `patcher merge` of the two specialists' runs, which must equal `parallel`.",
    ]
    for method, section in sections.items():
        lines += [
            "",
            f"## method `{method}`",
            "",
            "| model | " + " | ".join(tasks.values()) + " | mean (patch) | alpha / coefficient |",
            "|---|" + "---:|" * (len(tasks) + 2),
        ]
        for label, row in section["rows"].items():
            accuracy = row["accuracy"]
            cells = [f"{accuracy[task]:.2f}" if task in accuracy else "-" for task in tasks]
            mean = statistics.mean(accuracy[task] for task in patch if task in accuracy)
            lines.append(f"| {label} | {' | '.join(cells)} | {mean:.2f} | {row['alpha']} |")
        lines += ["", f"parallel equals merge: {section['parallel_equals_merge']}"]
    return "\n".join([*lines, ""])


def multitask(model: str, method: str, seed: int, runs_dir: Path, inverted: str) -> dict[str, Any]:
    """Specialists, joint, sequential, parallel and the merge of the specialists, for one method."""
    specialists = {"digits": runs_dir / f"digits-{method}-seed{seed}",
                   inverted: runs_dir / f"inverted-{method}-seed{seed}"}
    for task, path in specialists.items():
        run_build(model, task, path, method, seed)
    strategies = {
        strategy: summary(run_build(model, f"digits,{inverted}", runs_dir / f"multi-{method}-{strategy}-seed{seed}",
                                    method, seed, strategy))
        for strategy in ("joint", "sequential", "parallel")
    }
    merged_dir = runs_dir / f"merge-{method}-seed{seed}"
    if not (merged_dir / "manifest.json").is_file():
        merge_runs(MergeOptions(runs=list(specialists.values()), out=merged_dir, device="cpu"))
    strategies["merge"] = summary(load_run(merged_dir))

    names = {"digits": "digits", inverted: "digits-inverted"}
    rows: dict[str, dict[str, Any]] = {
        "zero-shot": {"accuracy": strategies["joint"]["test_accuracy"]["zeroshot"], "alpha": "0"}}
    for task, path in specialists.items():
        manifest = to_json(load_run(path).manifest)
        rows[f"specialist {names[task]}"] = {"accuracy": manifest["test_accuracy"]["patched"],
                                             "alpha": f"{manifest['alpha']['chosen']:g}"}
    own = {short_name(task): load_run(path).manifest.test_accuracy["patched"][short_name(task)]
           for task, path in specialists.items()}
    rows["specialists, each on its own task"] = {"accuracy": own, "alpha": "-"}
    for strategy, result in strategies.items():
        alpha = ", ".join(f"{a:g}" for a in result["alpha_steps"]) or f"{result['alpha']:g}"
        rows[strategy] = {"accuracy": result["test_accuracy"]["patched"], "alpha": alpha}
    same = _same(strategies["parallel"]["test_accuracy"], strategies["merge"]["test_accuracy"])
    return {"rows": rows, "strategies": strategies, "parallel_equals_merge": same}


def _same(first: dict[str, dict[str, float]], second: dict[str, dict[str, float]]) -> bool:
    return all(abs(first[kind][task] - second[kind][task]) < 1e-6 for kind in first for task in first[kind])


def main() -> None:
    """Run the scenario and write the four result files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="patcher-reference", help="open_clip model (default: the shipped one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--multi-methods", nargs="+", default=["ft", "flyp"], help="methods for the multi-task part")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-methods"))
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    model = args.model
    started = time.perf_counter()
    machine = {**machine_info(), "created": now_iso()}
    runs_dir = args.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    inverted = make_inverted_digits(runs_dir / "data" / "digits-inverted")

    results: dict[str, list[dict[str, Any]]] = {}
    for label, (method, params, folder) in VARIANTS.items():
        results[label] = [summary(run_build(model, "digits", runs_dir / f"digits-{folder}-seed{seed}", method, seed,
                                            params=params)) for seed in args.seeds]
    write_json(args.results_dir / "methods.json", {"model": model, "patch": "digits", "support": SUPPORT,
                                                    "seeds": args.seeds, "machine": machine, "methods": results})
    (args.results_dir / "methods.md").write_text(methods_markdown(results, model, args.seeds, machine))

    seed = args.seeds[0]
    tasks = {"digits": "digits", short_name(inverted): "digits-inverted", SUPPORT: SUPPORT}  # as manifests name them
    sections = {method: multitask(model, method, seed, runs_dir, inverted) for method in args.multi_methods}
    write_json(args.results_dir / "multitask.json", {"model": model, "tasks": tasks, "seed": seed, "methods": sections,
                                                      "machine": machine,
                                                      "total_s": round(time.perf_counter() - started, 1)})
    (args.results_dir / "multitask.md").write_text(multitask_markdown(sections, tasks, model, machine))
    print((args.results_dir / "methods.md").read_text())
    print((args.results_dir / "multitask.md").read_text())


if __name__ == "__main__":
    main()
