"""Three of the seeds' findings in miniature, offline, with the demo's reference mini CLIP (ft, 3 seeds, test splits).

1. PAINT's typographic attack: `typographic-digits` (a handwritten digit beside a printed, wrong one) patched with
   `--support digits,fashion-mnist`; how far the print lowers zero-shot accuracy against clean digits, how much
   patching recovers, what the supported tasks pay, and how often each model follows the print.
2. WiSE-FT's robustness: `digits` patched (`--support fashion-mnist:1`) while printed digits and four shifted
   versions of the handwriting (inverted, rotated, blurred, low contrast) are monitored: where the chosen alpha
   stands against zero-shot and fine-tuned out of distribution.
3. PAINT's broad transfer: handwritten digits 0-4 patched while digits 5-9 (disjoint classes) are monitored, and
   the other way round.

    .venv/bin/python bench/case_studies.py                  # the shipped reference model, seeds 0 1 2
    .venv/bin/python bench/case_studies.py --seeds 0 --model local-dir:DIR

Every build uses the demo's settings (300 steps of 64, lr 1e-4, no augmentation) and the grid search (all 11
alphas, so that every seed's held-out curve has the same points; the rule is the demo's). Finished runs under
--runs-dir are reused; the typographic case also tries 12 other fine-tunes on seed 0 (--no-sweep skips them).
Writes bench/results/case-studies.{md,json} and case-studies-{typographic,shift,transfer}.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two busy cores: spinning OpenMP threads slow torch 10x

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from safetensors.torch import load_file

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.machine import machine_info
from patcher.data.options import DataOptions
from patcher.data.tasks import get_task
from patcher.data.tasks.typographic_digits import rendered
from patcher.data.transforms import eval_transform
from patcher.models import build_from_config
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.state import split_classifier_state
from patcher.runs.manifest import Run, load_run
from patcher.runs.plots import CurveRoles, alpha_curve_plot, wiseft_plot
from patcher.runs.weights import verified_config, verified_weights
from patcher.stages.build import BuildOptions, build
from patcher.stages.demo import DemoOptions

KINDS = ("zeroshot", "finetuned", "patched")
DEMO = DemoOptions()


@dataclass(frozen=True)
class Setting:
    """How one build fine-tunes: the demo's settings unless changed."""

    label: str
    lr: float = DEMO.train_config.lr
    steps: int = DEMO.train_config.steps
    augment: bool = DEMO.augment
    method: str = "ft"


# what else was tried on the typographic attack (seed 0): shorter, longer, gentler and harsher fine-tunes,
# augmentation, and the other methods; the rule and its tolerance are the same in every one
SWEEP = (
    Setting("lr 3e-5", lr=3e-5), Setting("lr 1e-5", lr=1e-5), Setting("100 steps", steps=100),
    Setting("60 steps", steps=60), Setting("lr 3e-4, 100 steps", lr=3e-4, steps=100),
    Setting("lr 3e-4, 40 steps", lr=3e-4, steps=40), Setting("lr 6e-4, 40 steps", lr=6e-4, steps=40),
    Setting("lr 1e-3, 20 steps", lr=1e-3, steps=20), Setting("augmentation", augment=True),
    Setting("lpft", method="lpft"), Setting("flyp", method="flyp"), Setting("carft", method="carft"),
)
SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {  # applied to the digit upscaled to 28 px
    "inverted": ImageOps.invert,
    "rotated": lambda image: image.rotate(30, resample=Image.Resampling.BILINEAR),
    "blurred": lambda image: image.filter(ImageFilter.GaussianBlur(1.5)),
    "low-contrast": lambda image: ImageEnhance.Contrast(image).enhance(0.35),
}


def folder_task(root: Path, name: str, classes: list[int], shift: Callable[[Image.Image], Image.Image] | None) -> str:
    """folder: task `name` from digits' own train and test parts: the given classes, optionally shifted."""
    target = root / name
    if (target / "classnames.txt").is_file():
        return f"folder:{target}"
    digits = get_task("digits")
    staging = root / f".{name}.partial"
    for split in ("train", "test"):
        data = digits.dataset(split)
        for number in range(len(data)):
            image, label = data[number]
            if label not in classes:
                continue
            if shift is not None:
                image = shift(image.convert("L").resize((28, 28), Image.Resampling.BICUBIC)).convert("RGB")
            folder = staging / split / f"{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{number:05d}.png")
    write_text(staging / "classnames.txt", "".join(f"{c:02d}: {c}\n" for c in classes))  # folder: class name
    write_text(staging / "templates.txt", "".join(f"{t}\n" for t in digits.templates))
    staging.rename(target)
    return f"folder:{target}"


def run_build(model: str, out: Path, task: str, support: list[str], monitor: list[str], seed: int,
              setting: Setting | None = None) -> Run:
    """Build with the demo's settings (or `setting`'s) and the grid search, or reuse the finished run."""
    setting = setting or Setting("demo")
    if not (out / "manifest.json").is_file():
        config = replace(DEMO.train_config, seed=seed, lr=setting.lr, steps=setting.steps,
                         warmup_steps=min(DEMO.train_config.warmup_steps, max(1, setting.steps // 10)))
        build(BuildOptions(task=task, support=support, monitor=monitor, model=model, pretrained=None, search="grid",
                           method=setting.method, train_config=config, data=DataOptions(augment=setting.augment),
                           device="cpu", out=out))
    return load_run(out)


def short(task: str) -> str:
    """A task's name: a folder task is named by its folder (what the manifest records it under)."""
    return Path(task.removeprefix("folder:")).name if task.startswith("folder:") else task


def summary(run: Run) -> dict[str, Any]:
    """Test figures by model and task, the alpha, the held-out curve, the build time."""
    manifest = run.manifest
    return {"run": run.name, "alpha": manifest.alpha.chosen, "test_accuracy": manifest.test_accuracy,
            "test_macro_f1": manifest.test_macro_f1, "test_worst_class_accuracy": manifest.test_worst_class_accuracy,
            "curve": {point.alpha: point.val_accuracy for point in manifest.alpha.curve},
            "reference": manifest.alpha.zeroshot_val_accuracy, "seconds": run.timings.get("timings_s", {}).get("total")}


def predictions(run: Run, kind: str, task: str, images: list[Image.Image]) -> np.ndarray:
    """What a stored model predicts for images (open_clip's eval transform, the stored encoder and head)."""
    config = verified_config(run)
    encoder_state, heads = split_classifier_state(load_file(str(verified_weights(run, kind))))
    encoder = build_from_config(config).visual
    encoder.load_state_dict(encoder_state)
    transform = eval_transform(config["preprocess_cfg"])
    with torch.no_grad():
        logits = MultiHeadClassifier(encoder, {task: heads[task]})(torch.stack([transform(i) for i in images]))[task]
    return logits.argmax(dim=1).numpy()


def follows_print(run: Run) -> dict[str, float]:
    """Per model, the share (%) of typographic-digits test images predicted as their printed (wrong) digit."""
    data = get_task("typographic-digits").dataset("test")
    images = [data[i][0] for i in range(len(data))]
    printed = rendered("test")[2]
    return {kind: 100.0 * float((predictions(run, kind, "typographic-digits", images) == printed).mean())
            for kind in ("zeroshot", "patched")}


def mean_std(values: list[float]) -> str:
    """'mean ± std' over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def mean_curve(runs: list[dict[str, Any]]) -> dict[float, dict[str, float]]:
    """The held-out curve averaged over seeds (the grid search gives every seed the same alphas)."""
    alphas = sorted(runs[0]["curve"])
    return {a: {t: statistics.mean(r["curve"][a][t] for r in runs) for t in runs[0]["curve"][a]} for a in alphas}


def column(runs: list[dict[str, Any]], key: str, kind: str, task: str) -> list[float]:
    """One figure over seeds (a folder task is recorded under its folder's name)."""
    return [r[key][kind][short(task)] for r in runs]


def check(result: dict[str, Any]) -> dict[str, Any]:
    """The typographic targets: the print costs >= 20 points at zero-shot, patching recovers >= 20 of them, and
    Fashion-MNIST stays within 1 point of zero-shot."""
    acc = result["test_accuracy"]
    drop = acc["zeroshot"]["digits"] - acc["zeroshot"]["typographic-digits"]
    recovered = acc["patched"]["typographic-digits"] - acc["zeroshot"]["typographic-digits"]
    fashion = acc["patched"]["fashion-mnist"] - acc["zeroshot"]["fashion-mnist"]
    return {"drop": drop, "recovered": recovered, "fashion_change": fashion,
            "met": drop >= 20 and recovered >= 20 and abs(fashion) <= 1}


def typographic(model: str, seeds: list[int], runs_dir: Path, sweep: bool) -> dict[str, Any]:
    """Case 1: the print's cost at zero-shot, what patching recovers, what the supported tasks pay; with `sweep`,
    the other settings tried on seed 0."""
    runs = []
    support = ["digits", "fashion-mnist"]
    for seed in seeds:
        run = run_build(model, runs_dir / f"typographic-seed{seed}", "typographic-digits", support, [], seed)
        runs.append({**summary(run), "follows_print": follows_print(run)})
    tried = {}
    for setting in SWEEP if sweep else ():
        slug = setting.label.replace(", ", "-").replace(" ", "")
        result = summary(run_build(model, runs_dir / f"typographic-sweep-{slug}", "typographic-digits", support, [],
                                   seeds[0], setting))
        tried[setting.label] = {**result, "check": check(result)}
    return {"runs": runs, "checks": [check(r) for r in runs], "sweep": tried}


def shift(model: str, seeds: list[int], runs_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Case 2: digits patched, printed and shifted digits monitored."""
    shifted = [folder_task(data_dir, f"digits-{name}", list(range(10)), change) for name, change in SHIFTS.items()]
    monitor = ["printed-digits", *shifted]
    runs = [summary(run_build(model, runs_dir / f"shift-seed{seed}", "digits", ["fashion-mnist:1"], monitor, seed))
            for seed in seeds]
    return {"runs": runs, "monitor": monitor}


def transfer(model: str, seeds: list[int], runs_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Case 3: one half of the digit classes patched, the other half monitored, both ways round."""
    low = folder_task(data_dir, "digits-0-4", [0, 1, 2, 3, 4], None)
    high = folder_task(data_dir, "digits-5-9", [5, 6, 7, 8, 9], None)
    directions = {}
    for name, (patch, other) in {"0-4 patched": (low, high), "5-9 patched": (high, low)}.items():
        slug = name.split()[0]
        directions[name] = {"patch": patch, "monitor": other, "runs": [
            summary(run_build(model, runs_dir / f"transfer-{slug}-seed{seed}", patch, ["fashion-mnist"], [other],
                              seed)) for seed in seeds]}
    return directions


def figures(results: dict[str, Any], results_dir: Path) -> None:
    """One PNG per case, from the held-out curves averaged over seeds."""
    typo = results["typographic"]["runs"]
    zeroshot = {t: statistics.mean(r["reference"][t] for r in typo) for t in typo[0]["reference"]}
    alpha_curve_plot(mean_curve(typo), statistics.median(r["alpha"] for r in typo),
                     results_dir / "case-studies-typographic.png",
                     CurveRoles(patch=["typographic-digits"], zeroshot=zeroshot, tolerance=1.0),
                     title="typographic-digits patched: held-out accuracy, mean over seeds")
    runs = results["shift"]["runs"]
    curve = {a: {short(t): v for t, v in row.items()} for a, row in mean_curve(runs).items()}
    roles = {short(t): "monitor" for t in results["shift"]["monitor"]} | {"fashion-mnist": "support"}
    wiseft_plot(curve, statistics.median(r["alpha"] for r in runs), results_dir / "case-studies-shift.png",
                ["digits"], roles, title="digits patched: shifted digits over alpha (held-out, mean over seeds)")
    direction = results["transfer"]["0-4 patched"]
    curve = {a: {short(t): v for t, v in row.items()} for a, row in mean_curve(direction["runs"]).items()}
    wiseft_plot(curve, statistics.median(r["alpha"] for r in direction["runs"]),
                results_dir / "case-studies-transfer.png", [short(direction["patch"])],
                {short(direction["monitor"]): "monitor", "fashion-mnist": "support"},
                title="digits 0-4 patched: digits 5-9 over alpha (held-out, mean over seeds)")


def best_alpha(runs: list[dict[str, Any]], task: str) -> float:
    """The alpha with the best mean held-out accuracy on a task."""
    curve = mean_curve(runs)
    return max(sorted(curve), key=lambda a: curve[a][short(task)])


def markdown(results: dict[str, Any], model: str, seeds: list[int], machine: dict[str, Any]) -> str:
    """bench/results/case-studies.md."""
    lines = ["# What patching breaks: three case studies in miniature (offline mini CLIP)", "",
             f"Model `{model}`; `ft` with the demo's settings, seeds {seeds}, grid search over alpha, tolerance 1 "
             "point; test accuracy (%), mean ± std over seeds unless said otherwise.",
             f"Measured {machine['created']} on {machine['cpu']} ({machine['usable_cores']} usable cores, no GPU).",
             "", "## 1. Typographic attack (PAINT)", "",
             "`typographic-digits`: a handwritten digit (left half) beside a printed, wrong digit (right half), "
             "patched with `--support digits,fashion-mnist`.", "",
             "| | zero-shot | fine-tuned | patched | patched - zero-shot |", "|---|---:|---:|---:|---:|"]
    typo = results["typographic"]
    for task in ("typographic-digits", "digits", "fashion-mnist"):
        cells = [mean_std(column(typo["runs"], "test_accuracy", k, task)) for k in KINDS]
        change = [r["test_accuracy"]["patched"][task] - r["test_accuracy"]["zeroshot"][task] for r in typo["runs"]]
        lines.append(f"| {task} | {' | '.join(cells)} | {mean_std(change)} |")
    follows = {k: mean_std([r["follows_print"][k] for r in typo["runs"]]) for k in ("zeroshot", "patched")}
    lines += ["", f"Predicted as the printed digit: zero-shot {follows['zeroshot']}%, patched {follows['patched']}% "
              "(chance 10%). Alpha per seed: " + ", ".join(f"{r['alpha']:g}" for r in typo["runs"]) + ".", "",
              "| seed | print's cost at zero-shot (clean digits - typographic) | recovered by patching | "
              "Fashion-MNIST patched - zero-shot | all three targets (>= 20, >= 20, within 1) |",
              "|---|---:|---:|---:|---|"]
    for seed, targets in zip(seeds, typo["checks"], strict=True):
        lines.append(f"| {seed} | {targets['drop']:.2f} | {targets['recovered']:.2f} | "
                     f"{targets['fashion_change']:+.2f} | {'met' if targets['met'] else 'not met'} |")
    if typo["sweep"]:
        lines += ["", f"Other fine-tunes tried (seed {seeds[0]}; the same rule and tolerance; test accuracy):", "",
                  "| setting | alpha | typographic patched - zero-shot | fine-tuned | "
                  "Fashion-MNIST patched - zero-shot | fine-tuned | targets |", "|---|---:|---:|---:|---:|---:|---|"]
        for label, result in typo["sweep"].items():
            acc, targets = result["test_accuracy"], result["check"]
            lines.append(f"| {label} | {result['alpha']:g} | {targets['recovered']:+.2f} | "
                         f"{acc['finetuned']['typographic-digits']:.2f} | {targets['fashion_change']:+.2f} | "
                         f"{acc['finetuned']['fashion-mnist']:.2f} | {'met' if targets['met'] else 'not met'} |")
    lines += ["", "![typographic](case-studies-typographic.png)", "", "## 2. Robustness under shift (WiSE-FT)", "",
              "`digits` patched with `--support fashion-mnist:1`; monitored: printed digits and the handwriting "
              "inverted, rotated 30°, blurred and at 35% contrast. The last column is the alpha with the best mean "
              "held-out accuracy on that task.", "",
              "| task | zero-shot | fine-tuned | patched | patched above both ends | best held-out alpha |",
              "|---|---:|---:|---:|---|---:|"]
    runs = results["shift"]["runs"]
    for task in ["digits", *results["shift"]["monitor"], "fashion-mnist"]:
        cells = [mean_std(column(runs, "test_accuracy", k, task)) for k in KINDS]
        above = sum(r["test_accuracy"]["patched"][short(task)] > max(r["test_accuracy"]["zeroshot"][short(task)],
                                                                      r["test_accuracy"]["finetuned"][short(task)])
                    for r in runs)
        lines.append(f"| {short(task)} | {' | '.join(cells)} | {above}/{len(runs)} seeds | "
                     f"{best_alpha(runs, task):g} |")
    lines += ["", "Alpha per seed: " + ", ".join(f"{r['alpha']:g}" for r in runs) + ".", "",
              "![shift](case-studies-shift.png)", "", "## 3. Broad transfer (PAINT)", "",
              "One half of the handwritten digit classes patched (`--support fashion-mnist`), the other half "
              "monitored: disjoint classes, the same domain.", "",
              "| patched | monitored | monitored zero-shot | fine-tuned | patched | patch task zero-shot -> patched |",
              "|---|---|---:|---:|---:|---|"]
    for direction in results["transfer"].values():
        patch, other, dir_runs = direction["patch"], direction["monitor"], direction["runs"]
        cells = [mean_std(column(dir_runs, "test_accuracy", k, other)) for k in KINDS]
        own = " -> ".join(mean_std(column(dir_runs, "test_accuracy", k, patch)) for k in ("zeroshot", "patched"))
        lines.append(f"| {short(patch)} | {short(other)} | {' | '.join(cells)} | {own} |")
    alphas = "; ".join(f"{short(d['patch'])} " + ", ".join(f"{r['alpha']:g}" for r in d["runs"])
                       for d in results["transfer"].values())
    lines += ["", f"Alpha per seed: {alphas}.", "", "![transfer](case-studies-transfer.png)", ""]
    return "\n".join(lines)


def main() -> None:
    """Run the three cases and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="patcher-reference", help="open_clip model (default: the shipped one)")
    parser.add_argument("--cases", default="typographic,shift,transfer", help="which cases to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/case-studies"))
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-sweep", action="store_true", help="skip the other typographic fine-tunes (12 builds)")
    args = parser.parse_args()
    model = args.model
    started = time.perf_counter()
    machine = {**machine_info(), "created": now_iso()}
    runs_dir = args.runs_dir.resolve()
    data_dir = runs_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    cases = {"typographic": lambda: typographic(model, args.seeds, runs_dir, not args.no_sweep),
             "shift": lambda: shift(model, args.seeds, runs_dir, data_dir),
             "transfer": lambda: transfer(model, args.seeds, runs_dir, data_dir)}
    results = {name: cases[name]() for name in args.cases.split(",")}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    figures(results, args.results_dir)
    write_json(args.results_dir / "case-studies.json",
               {"model": model, "seeds": args.seeds, "machine": machine, "cases": results,
                "total_s": round(time.perf_counter() - started, 1)})
    write_text(args.results_dir / "case-studies.md", markdown(results, model, args.seeds, machine))
    print((args.results_dir / "case-studies.md").read_text())


if __name__ == "__main__":
    main()
