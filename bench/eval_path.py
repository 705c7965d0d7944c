"""What streamed evaluation costs: the disk cache's first fill, its reuse, and one pass per alpha, at 224 px.

    .venv/bin/python bench/eval_path.py [--images 2000] [--models patcher-tiny-p32 ViT-B-32]

A `folder:` test split of 320x240 JPEGs (bench/data_path.py's generator) goes through the build's own path:
`build_store` decodes and resizes it once into a uint8 disk store under a fresh PATCHER_CACHE, a second
`build_store` finds it, and `predict` scores it as every alpha of the search does. Peak RSS is sampled
after each step; figures per image extrapolate to held-out splits of 5,000 and test splits of 50,000
images. Writes bench/results/eval-path.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_path import make_folder

from patcher.benchmark.machine import machine_info
from patcher.data.evaluation import Scorer, predict
from patcher.data.image_store import build_store
from patcher.data.tasks import get_task
from patcher.data.transforms import Normalize
from patcher.models import load_clip
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.heads import build_head


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(model: str, root: Path, cache: Path, batch_size: int) -> dict[str, Any]:
    """Cache fill, cache reuse and one scoring pass of `model` over the folder's test split."""
    task = get_task(f"folder:{root}")
    loaded = load_clip(model, None, 224)
    head = build_head(loaded, list(task.classnames), list(task.templates))
    classifier = MultiHeadClassifier(loaded.model.visual, {task.name: head})
    dataset = task.dataset("test")
    record: dict[str, Any] = {"images": len(dataset), "rss_after_load_mb": peak_rss_mb()}
    tick = time.perf_counter()
    store, _ = build_store(dataset, loaded.preprocess_cfg, "filling the disk cache", in_memory=False,
                           cache_dir=cache)
    record["fill_s"] = round(time.perf_counter() - tick, 2)
    record["rss_after_fill_mb"] = peak_rss_mb()
    tick = time.perf_counter()
    store, _ = build_store(dataset, loaded.preprocess_cfg, "reusing the disk cache", in_memory=False, cache_dir=cache)
    record["reuse_s"] = round(time.perf_counter() - tick, 3)
    normalize = Normalize(loaded.preprocess_cfg)
    tick = time.perf_counter()
    predict(Scorer(classifier=classifier, normalize=normalize, batch_size=batch_size), store, task.name)
    record["score_s"] = round(time.perf_counter() - tick, 2)
    record["rss_after_score_mb"] = peak_rss_mb()
    record["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20, 1)
    per_image = {"fill_ms": 1000 * record["fill_s"] / len(dataset), "score_ms": 1000 * record["score_s"] / len(dataset)}
    record["per_image_ms"] = {key: round(value, 3) for key, value in per_image.items()}
    record["extrapolated"] = {
        f"{count:,} images": {"fill_min": round(count * per_image["fill_ms"] / 60_000, 1),
                              "score_per_alpha_min": round(count * per_image["score_ms"] / 60_000, 1),
                              "cache_gb": round(count * record["cache_mb"] / len(dataset) / 1024, 2)}
        for count in (5_000, 50_000)}
    return record


def markdown(result: dict[str, Any]) -> str:
    """The results as a table, one row per model."""
    lines = ["# Streamed evaluation at 224 px: disk cache and scoring", "",
             f"{result['created']}, {result['machine']['cpu']} ({result['machine']['usable_cores']} usable cores); "
             f"{result['images']} test images (320x240 JPEGs) of a "
             f"folder: task; torch threads {result['threads']}; eval batch {result['batch_size']}.", "",
             "Each model in its own process (peak RSS is that process's).", "",
             "| model | cache fill s | reuse s | score s (one alpha) | ms/image fill, score | cache MB | peak RSS MB "
             "(load, fill, score) | 50,000 images: fill min, score min per alpha, cache GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, r in result["models"].items():
        big = r["extrapolated"]["50,000 images"]
        lines.append(f"| {model} | {r['fill_s']} | {r['reuse_s']} | {r['score_s']} | {r['per_image_ms']['fill_ms']}, "
                     f"{r['per_image_ms']['score_ms']} | {r['cache_mb']} | {r['rss_after_load_mb']}, "
                     f"{r['rss_after_fill_mb']}, {r['rss_after_score_mb']} | {big['fill_min']}, "
                     f"{big['score_per_alpha_min']}, {big['cache_gb']} |")
    lines += ["", "Scoring reads the store a batch at a time (pread), so what it adds to memory is the model's "
              "activations for one batch, whatever the split's size (bench/results/data-path.md has peak RSS "
              "against dataset size). The fill runs once per split and later builds reuse it (its key: the files' "
              "paths, sizes and times and the transform); the golden search scores at most 7 alphas.", ""]
    return "\n".join(lines)


def main() -> None:
    """Measure each model in its own process and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--models", nargs="+", default=["patcher-tiny-p32", "ViT-B-32"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, work = args.one
        print(json.dumps(measure(model, Path(work) / "data", Path(work) / f"cache-{model}", args.batch_size)))
        return
    result: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": args.images,
                              "batch_size": args.batch_size, "machine": machine_info(),
                              "threads": torch.get_num_threads(), "models": {}}
    with tempfile.TemporaryDirectory() as work:
        make_folder(Path(work) / "data", train=10, test=args.images)
        for model in args.models:
            command = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--one", model, work]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result["models"][model] = json.loads(output.strip().splitlines()[-1])
            print(json.dumps({model: result["models"][model]}), flush=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "eval-path.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results_dir / "eval-path.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
