"""Benchmark of the streaming data path: peak memory against dataset size, training throughput, demo build time.

    .venv/bin/python bench/data_path.py [--baseline-tree DIR] [--quick]

Writes bench/results/data-path.{json,md,png}. Three measurements, each side by side in one run:
1. Peak memory of `patcher build` on a 224-px folder dataset (synthetic JPEGs in ImageFolder layout) of
   600 and 2,400 training images (and a test split a quarter that size), the tiny model, 2 steps; the
   main process's peak RSS (getrusage) and the peak PSS of its whole process tree (workers included).
2. Training images/s at 224 px: the streaming path (JPEG files decoded by a DataLoader worker, with and
   without augmentation) against the in-memory path (a RAM store of decoded pixels), rounds interleaved.
3. The demo's build (digits patched, Fashion-MNIST supported, 300 steps x 64) against the code before the
   streaming path (`--baseline-tree`: a checkout of that commit), rounds interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10


def make_folder(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """A folder: dataset of `train` + `test` 320x240 JPEGs (smooth shapes on gradients, one look per class)."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for number in range(count):
            label = number % CLASSES
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
            image = Image.fromarray(np.broadcast_to(base, (240, 320, 3)).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x, y = rng.integers(0, 280), rng.integers(0, 200)
                draw.ellipse((x, y, x + 20 + 4 * label, y + 20 + 3 * label), fill=tuple(rng.integers(0, 255, 3)))
            image.save(folder / f"{number:06d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def _tree(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured_run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a command in its source tree (`python -m` puts the working directory first on sys.path); its wall time,
    exit code, main-process peak RSS and sampled peak PSS of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    peak = {"pss_kb": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["pss_kb"] = max(peak["pss_kb"], sum(_pss_kb(pid) for pid in _tree(process.pid)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    stderr = process.stderr.read() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - started, 2), "returncode": process.returncode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_tree_pss_mb": round(peak["pss_kb"] / 1024, 1),
            "error": stderr.strip().splitlines()[-1] if process.returncode else None}


def _env(tree: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "PATCHER_CACHE": str(cache)}


def build_command(tree: Path, args: list[str], new: bool) -> list[str]:
    """`patcher build ARGS` from a source tree (the baseline's CLI is `python -m patcher.cli`)."""
    return [sys.executable, "-m", "patcher" if new else "patcher.cli", "build", *args]


def memory_section(work: Path, baseline: Path | None, quick: bool) -> dict[str, Any]:
    """Peak memory of a 2-step build at 224 px on 600 and 2,400 training images."""
    sizes = (150, 600) if quick else (600, 2400)
    if baseline is not None:  # the baseline tree predates the 224-px tiny config: give it the same file
        config = ROOT / "patcher" / "models" / "configs" / "patcher-tiny-p32.json"
        (baseline / "patcher" / "models" / "configs" / config.name).write_bytes(config.read_bytes())
    rows = []
    for train in sizes:
        root = make_folder(work / f"folder-{train}", train, train // 4)
        common = ["--task", f"folder:{root}", "--model", "patcher-tiny-p32", "--pretrained", "none", "--steps", "2",
                  "--batch-size", "32", "--alpha", "0.5", "--device", "cpu"]
        new_only = ["--eval-batch-size", "32"]  # the baseline evaluates in batches of 256 and has no such flag
        trees = [("streaming (auto)", ROOT, True, new_only),
                 ("streaming (--data-mode stream)", ROOT, True, [*new_only, "--data-mode", "stream"])]
        if baseline is not None:
            trees.append(("before: every split in RAM as float32", baseline, False, []))
        for label, tree, new, extra in trees:
            out = work / "runs" / f"{label.split()[0]}-{train}-{len(extra)}-{time.time_ns()}"
            cache = work / f"cache-{out.name}"  # a cold cache: the store is decoded within the measured build
            result = measured_run(build_command(tree, [*common, *extra, "--out", str(out)], new), _env(tree, cache))
            rows.append({"path": label, "train_images": train, "test_images": train // 4, **result})
            print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    for label in dict.fromkeys(row["path"] for row in rows):
        small, large = (next(r for r in rows if r["path"] == label and r["train_images"] == n) for n in sizes)
        ratios[label] = {"rss": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                         "tree_pss": round(large["peak_tree_pss_mb"] / small["peak_tree_pss_mb"], 3)}
    return {"sizes": list(sizes), "rows": rows, "ratio_large_to_small": ratios}


def _train_rate(model: str, split: Any, steps: int, warmup: int, batch: int) -> float:
    import torch

    from patcher.data.tasks import get_task
    from patcher.models import load_clip
    from patcher.training.config import TrainConfig
    from patcher.training.loop import Tracking, train
    from patcher.training.methods import MethodSetup
    from patcher.training.methods.ft import FineTune

    torch.manual_seed(0)
    loaded = load_clip(model, None, 224)
    head = torch.nn.functional.normalize(torch.randn(loaded.embed_dim, CLASSES), dim=0) * 30
    config = TrainConfig(steps=warmup + steps, batch_size=batch, lr=1e-5, warmup_steps=0, log_every=1)
    method = FineTune(MethodSetup(loaded, {"t": split}, {"t": get_task("digits")}, {"t": head}, config), None)
    times: dict[int, float] = {}
    train(method.encoder, method.encoder.parameters(), method.step_loss, config, "cpu",
          Tracking(log=lambda entry: times.__setitem__(entry["step"], time.perf_counter())))
    method.close()
    return steps * batch / (times[warmup + steps] - times[warmup])


def throughput_section(work: Path, quick: bool) -> dict[str, Any]:
    """Training images/s at 224 px: streaming from JPEG files against a RAM store, interleaved rounds."""
    from patcher.data.image_store import StoreItems, build_store
    from patcher.data.items import TransformedItems
    from patcher.data.options import default_workers
    from patcher.data.prepared_splits import TrainSplit
    from patcher.data.tasks import get_task
    from patcher.data.transforms import Normalize, eval_transform, train_transform

    root = make_folder(work / "folder-600", 600, 150)
    dataset = get_task(f"folder:{root}").dataset("train")
    cfg = {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
           "interpolation": "bicubic", "resize_mode": "shortest"}
    store, _ = build_store(dataset, cfg, "decoding the in-memory split", in_memory=True)
    workers = default_workers()
    paths = {
        "in memory (RAM store, no augmentation)": TrainSplit(StoreItems(store, Normalize(cfg))),
        f"streaming ({workers} worker, eval transform)": TrainSplit(TransformedItems(dataset, eval_transform(cfg)),
                                                                     workers),
        f"streaming ({workers} worker, train transform)": TrainSplit(
            TransformedItems(dataset, train_transform(cfg)), workers),
    }
    steps, warmup, rounds = (3, 1, 1) if quick else (12, 2, 2)
    models = ["patcher-tiny-p32"] if quick else ["ViT-S-32-alt", "patcher-tiny-p32"]
    results: dict[str, dict[str, list[float]]] = {}
    for model in models:
        results[model] = {name: [] for name in paths}
        for round_index in range(rounds):
            order = list(paths) if round_index % 2 == 0 else list(reversed(paths))
            for name in order:
                rate = _train_rate(model, paths[name], steps, warmup, 32)
                results[model][name].append(round(rate, 2))
                print(json.dumps({"model": model, "path": name, "images_per_s": rate}), flush=True)
    summary = {}
    for model, rates in results.items():
        memory = float(np.mean(rates[next(iter(paths))]))
        summary[model] = {name: {"images_per_s": round(float(np.mean(r)), 2),
                                 "ratio_to_memory": round(float(np.mean(r)) / memory, 3)} for name, r in rates.items()}
    return {"batch": 32, "steps_timed": steps, "rounds": rounds, "workers": workers, "rates": results,
            "summary": summary}


def _build_timings(run: Path) -> dict[str, float]:
    """A run's stage timings: timings.json now, the manifest's `timings_s` in the baseline's runs."""
    if (run / "timings.json").is_file():
        return json.loads((run / "timings.json").read_text())["timings_s"]
    return json.loads((run / "manifest.json").read_text()).get("timings_s", {})


def demo_build_section(work: Path, baseline: Path, quick: bool) -> dict[str, Any]:
    """The demo's build settings, new code against the baseline tree, on one small reference model."""
    model_dir = work / "reference"
    if not (model_dir / "pretrain.json").is_file():
        subprocess.run([sys.executable, "-m", "patcher", "pretrain", "--steps", "20", "--out", str(model_dir)],
                       env=_env(ROOT, work / "cache-pretrain"), check=True, stdout=subprocess.DEVNULL)
    steps = "30" if quick else "300"
    args = ["--task", "digits", "--support", "fashion-mnist", "--model", f"local-dir:{model_dir}", "--pretrained",
            "none", "--steps", steps, "--batch-size", "64", "--lr", "1e-4", "--warmup-steps", "30", "--device", "cpu"]
    new_only = ["--no-augment"]  # the demo's setting; the baseline had no augmentation
    rows: list[dict[str, Any]] = []
    rounds = 1 if quick else 2
    for round_index in range(rounds):
        order = [("streaming", ROOT, True), ("before", baseline, False)]
        for label, tree, new in order if round_index % 2 == 0 else reversed(order):
            out = work / "runs" / f"demo-{label}-{time.time_ns()}"
            given = [*args, *(new_only if new else []), "--out", str(out)]
            result = measured_run(build_command(tree, given, new), _env(tree, work / "cache-d"))
            timings = _build_timings(out) if not result["returncode"] else {}
            rows.append({"code": label, "round": round_index, **result, "build_timings_s": timings})
            print(json.dumps(rows[-1]), flush=True)
    means = {label: float(np.mean([r["seconds"] for r in rows if r["code"] == label])) for label in ("streaming",
                                                                                                    "before")}
    return {"rows": rows, "mean_seconds": means, "ratio_new_to_before": round(means["streaming"] / means["before"], 3)}


def markdown(record: dict[str, Any]) -> str:
    """The results as Markdown."""
    sections = ", ".join(f"{name} {when}" for name, when in record.get("sections_created", {}).items())
    lines = ["# Data path at scale", "",
             f"Machine: {record['machine']}. Sections run: {sections or record['created']}.", ""]
    memory = record["memory"]
    lines += ["## Peak memory of a 2-step build at 224 px (patcher-tiny-p32)", "",
              "| path | train images | test images | build s | main peak RSS MB | tree peak PSS MB |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['train_images']} | {r['test_images']} | {r['seconds']} | {r['peak_rss_mb']} | "
              f"{r['peak_tree_pss_mb']} |" for r in memory["rows"]]
    lines += ["", f"Ratio {memory['sizes'][1]} / {memory['sizes'][0]} images:", ""]
    lines += [f"- {path}: RSS {v['rss']}x, tree PSS {v['tree_pss']}x" for path, v in
              memory["ratio_large_to_small"].items()]
    through = record["throughput"]
    lines += ["", f"## Training images/s at 224 px (batch {through['batch']}, {through['steps_timed']} timed steps, "
              f"{through['rounds']} interleaved rounds)", "", "| model | path | images/s | / in memory |",
              "|---|---|---:|---:|"]
    for model, paths in through["summary"].items():
        lines += [f"| {model} | {path} | {v['images_per_s']} | {v['ratio_to_memory']} |" for path, v in paths.items()]
    if record.get("demo_build"):
        demo = record["demo_build"]
        lines += ["", "## The demo's build, before and after (interleaved rounds)", "",
                  "| code | round | seconds | main peak RSS MB |", "|---|---:|---:|---:|"]
        lines += [f"| {r['code']} | {r['round']} | {r['seconds']} | {r['peak_rss_mb']} |" for r in demo["rows"]]
        lines += ["", f"Mean time, streaming / before: {demo['ratio_new_to_before']}"]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    """Peak memory against training images for each path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    rows = record["memory"]["rows"]
    for label in dict.fromkeys(r["path"] for r in rows):
        mine = [r for r in rows if r["path"] == label]
        left.plot([r["train_images"] for r in mine], [r["peak_tree_pss_mb"] for r in mine], marker="o", label=label)
    left.set_xlabel("training images (224 px)")
    left.set_ylabel("peak memory of the build's processes (PSS, MB)")
    left.set_title("peak memory against dataset size")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    summary = record["throughput"]["summary"]
    names = list(next(iter(summary.values())))
    width = 0.8 / len(summary)
    for number, (model, paths) in enumerate(summary.items()):
        right.bar(np.arange(len(names)) + number * width, [paths[n]["ratio_to_memory"] for n in names], width,
                  label=model)
    right.axhline(0.9, color="black", linestyle=":", linewidth=1)
    right.set_xticks(np.arange(len(names)) + width / 2, [n.replace(" (", "\n(") for n in names], fontsize=7)
    right.set_ylabel("training images/s relative to in memory")
    right.set_title("training throughput at 224 px")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of the commit before the streaming path")
    parser.add_argument("--work", type=Path, default=Path("/tmp/patcher-data-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    parser.add_argument("--only", choices=("memory", "throughput", "demo_build"),
                        help="rerun one section, keeping the others of the last results file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from patcher.base.files import now_iso
    from patcher.benchmark.machine import machine_info

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["PATCHER_CACHE"] = str(args.work / "cache-inprocess")
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    name = "data-path-quick" if args.quick else "data-path"
    previous = args.out / f"{name}.json"
    record: dict[str, Any] = json.loads(previous.read_text()) if args.only and previous.is_file() else {}
    record.update({"format": "patcher-data-path-bench/1", "created": now_iso(), "machine_info": info,
                   "machine": f"{info.get('cpu', '?')}, {info.get('logical_cores', '?')} cores, "
                              f"{info.get('memory_gib', '?')} GiB, no GPU",
                   "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None})
    started = record.setdefault("sections_created", {})
    if args.only in (None, "memory"):
        started["memory"] = now_iso()
        record["memory"] = memory_section(args.work, args.baseline_tree, args.quick)
    if args.only in (None, "throughput"):
        started["throughput"] = now_iso()
        record["throughput"] = throughput_section(args.work, args.quick)
    if args.baseline_tree is not None and args.only in (None, "demo_build"):
        started["demo_build"] = now_iso()
        record["demo_build"] = demo_build_section(args.work, args.baseline_tree, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(record))
    plot(record, args.out / f"{name}.png")
    print(markdown(record))
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
