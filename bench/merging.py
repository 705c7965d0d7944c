"""Merging many patches: every registered merge method on the same fine-tuned checkpoints, under PAINT's rule.

For each seed, one single-task fine-tune per patch task (`patcher build`, the demo's settings), or the runs given
with --runs; then `patcher merge` of those runs with each method (task arithmetic, TIES, DARE, Breadcrumbs,
Consensus, WUDI, layer-wise AdaMerging unlabelled and labelled, and task arithmetic and WUDI projected off the
supported task's input subspaces), each in its own process so that its time and peak memory
are its own. "patcher's best" is the method whose chosen model scores best on held-out data with the rule holding
(chosen without looking at test). Then the memory of merging N runs: a ViT-B/32-sized image encoder, 8 task vectors
against 2, streamed as `patcher merge` reads them against all loaded at once.

    .venv/bin/python bench/merging.py --suite-runs runs/suite --seeds 0 1 2   # bench/suite.py's fine-tunes
    .venv/bin/python bench/merging.py                  # the shipped model, the mini-8 tasks, fashion-mnist, seed 0
    .venv/bin/python bench/merging.py --model local-dir:DIR --tasks a,b,c --support s --seeds 0 1 2
    .venv/bin/python bench/merging.py --runs RUN RUN ... --seeds 0 1 2   # fine-tunes already built

Writes bench/results/merging.{md,json,png}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two busy cores: spinning OpenMP threads slow torch 10x

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from patcher.base.files import now_iso, write_json
from patcher.benchmark.machine import machine_info
from patcher.data.tasks.suites import MINI_EIGHT

METHODS = ["task-arithmetic", "ties", "dare", "breadcrumbs", "consensus", "wudi", "layerwise", "layerwise-labelled",
           "task-arithmetic-nullspace", "wudi-nullspace"]
MEMORY_KEYS = ("ties", "task-arithmetic")
# parameters held in the memory measurement: WUDI's memory does not depend on its step count (one matrix and its
# Adam state at a time), and 300 steps on every ViT-B/32 matrix take hours on two CPU cores
MEMORY_PARAMS = {"wudi": {"steps": 3}}


class PeakMemory:
    """Peak resident (VmRSS) and anonymous (RssAnon) memory of this process, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak_rss = self.peak_anon = self.baseline_rss = self.baseline_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> tuple[float, float]:
        """(VmRSS, RssAnon) in MiB."""
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss, anon = self.now()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def __enter__(self) -> PeakMemory:
        self.baseline_rss, self.baseline_anon = self.now()
        self.peak_rss, self.peak_anon = self.baseline_rss, self.baseline_anon
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    def record(self) -> dict[str, float]:
        """Baselines and peaks in MiB."""
        return {key: round(getattr(self, key), 1) for key in ("baseline_rss", "peak_rss", "baseline_anon",
                                                              "peak_anon")}


def worker(argv: list[str]) -> None:
    """In a process of its own: one merge (`merge JSON`) or one memory measurement (`memory JSON`); prints JSON."""
    kind, spec = argv[0], json.loads(argv[1])
    if kind == "merge":
        from patcher.patching.merge_search import MergeSpec
        from patcher.stages.merge import MergeOptions, merge_runs

        options = MergeOptions(runs=[Path(r) for r in spec["runs"]], out=Path(spec["out"]), support=spec["support"],
                               device="cpu", merge=MergeSpec(spec["method"], spec.get("params", {}),
                                                             seed=spec["seed"], search=spec["search"]))
        started = time.perf_counter()
        with PeakMemory() as memory:
            merge_runs(options)
        print(json.dumps({"seconds": round(time.perf_counter() - started, 2), **memory.record()}))
    else:
        print(json.dumps(memory_worker(spec)))


def in_subprocess(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `worker` in a fresh interpreter; its JSON answer."""
    done = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], check=True,
                          stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the accuracy table -------------------------------------------------------------------------------------------

def build_runs(model: str, tasks: list[str], support: list[str], seed: int, runs_dir: Path) -> list[Path]:
    """One single-task fine-tune per patch task (reused when finished), the demo's settings, this seed."""
    from patcher.data.options import DataOptions
    from patcher.stages.build import BuildOptions, build
    from patcher.stages.demo import DemoOptions

    demo = DemoOptions()
    runs = []
    for task in tasks:
        out = runs_dir / f"{task.replace('/', '_').replace(':', '_')}-seed{seed}"
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            build(BuildOptions(task=task, support=support, model=model, pretrained=None, method="ft",
                               train_config=replace(demo.train_config, seed=seed),
                               data=DataOptions(augment=demo.augment), device="cpu", out=out))
        runs.append(out)
    return runs


def merged_row(run: Path, measured: dict[str, Any]) -> dict[str, Any]:
    """What the table shows of one merged run."""
    from patcher.runs.manifest import load_run

    manifest = load_run(run).manifest
    merge = manifest.multi.merge
    chosen = next(point for point in manifest.alpha.curve if point.alpha == manifest.alpha.chosen)
    zeroshot, patched = manifest.test_accuracy["zeroshot"], manifest.test_accuracy["patched"]
    return {
        "accuracy": {task: patched[task] for task in manifest.patch_tasks},
        "retained": merge.test_retained, "worst_task": merge.worst_task,
        "support_change": {task: patched[task] - zeroshot[task] for task in manifest.support_tasks},
        "val_patch_mean": statistics.mean(chosen.val_accuracy[t] for t in manifest.patch_tasks),
        "rule_held": manifest.alpha.warning is None, "coefficient": manifest.alpha.chosen, "params": merge.params,
        "own": merge.own_test_accuracy, "unguarded": unguarded(manifest.alpha.curve, manifest.patch_tasks,
                                                               merge.own_val_accuracy), **measured,
    }


def unguarded(curve: list[Any], tasks: list[str], own_val: dict[str, float]) -> dict[str, float]:
    """Among the coefficients the search evaluated (the chosen setting's, held-out data), the best mean retained
    share with the supported task ignored: how the methods rank without PAINT's guard, as the papers measure."""
    def retained(point: Any) -> float:
        return statistics.mean(point.val_accuracy[t] / own_val[t] for t in tasks)

    best = max(curve, key=retained)
    return {"coefficient": best.alpha, "mean_retained": retained(best),
            "worst_retained": min(best.val_accuracy[t] / own_val[t] for t in tasks)}


def one_seed(runs: list[Path], support: list[str], seed: int, methods: list[str], out_dir: Path,
             search: str, reuse: bool = False, fixed: dict[str, dict[str, float]] | None = None,
             assemble: bool = False) -> dict[str, Any]:
    """Every method's merge of these runs (with `reuse`, a merge this bench finished before for the same runs,
    support and search is read back instead of redone: a long bench can run in parts)."""
    rows = {}
    for method in methods:
        out = out_dir / f"{method}-seed{seed}"
        spec = {"runs": [str(r) for r in runs], "out": str(out), "support": support, "method": method,
                "seed": seed, "search": search, "params": (fixed or {}).get(method, {})}
        record = out / "bench-merge.json"  # what this bench measured, beside the merged run
        done = record.is_file() and {"params": {}, **json.loads(record.read_text())["spec"]} == spec
        if (reuse or assemble) and done:
            print(f"reusing {out}", flush=True)
            rows[method] = merged_row(out, json.loads(record.read_text())["measured"])
            continue
        if assemble:
            print(f"no finished {method} merge for seed {seed}: left out", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        print(f"merging {len(runs)} runs with {method} (seed {seed})", flush=True)
        measured = in_subprocess("merge", spec)
        write_json(record, {"spec": spec, "measured": measured})
        rows[method] = merged_row(out, measured)
    if not rows:
        raise SystemExit(f"no finished merge for seed {seed}: run the bench without --assemble first")
    own = next(iter(rows.values()))["own"]
    best = max((m for m in rows if rows[m]["rule_held"]), key=lambda m: rows[m]["val_patch_mean"],
               default=next(iter(rows)))
    return {"seed": seed, "runs": [str(r) for r in runs], "own": own, "rows": rows, "best": best,
            "single": single_patches(runs, support, own)}


def single_patches(runs: list[Path], support: list[str], own: dict[str, float]) -> dict[str, Any]:
    """Each run's own single-task PAINT patch (its `patched` model, chosen under the same rule when built): what
    one model per task keeps, the reference a merge under that rule is measured against."""
    from patcher.runs.manifest import load_run

    accuracy: dict[str, float] = {}
    change: dict[str, list[float]] = {task: [] for task in support}
    for run in runs:
        manifest = load_run(run).manifest
        patched, zeroshot = manifest.test_accuracy["patched"], manifest.test_accuracy["zeroshot"]
        accuracy.update({task: patched[task] for task in manifest.patch_tasks})
        for task in support:
            if task in patched:
                change[task].append(patched[task] - zeroshot[task])
    return {"accuracy": accuracy, "retained": {task: accuracy[task] / own[task] for task in accuracy if own.get(task)},
            "support_change": {task: min(values) for task, values in change.items() if values}}


def short(task: str) -> str:
    """A task's name for a table: a folder task by its folder's name."""
    return Path(task[len("folder:"):]).name if task.startswith("folder:") else task


def _mean(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    return f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(seeds: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """One markdown row per method (and the fine-tunes, and patcher's best): per task, mean, worst, support, cost;
    a method run on fewer seeds than the others says which, and its gain over task arithmetic is paired by seed."""
    methods = list(dict.fromkeys(m for s in seeds for m in s["rows"]))
    labels = {"individual fine-tunes": None, **{m: m for m in methods}, "patcher's best": "best"}
    header = " | ".join(f"{short(t)} acc (retained %)" for t in tasks)
    lines = [f"| model | {header} | mean acc | mean retained % | vs task arithmetic (points of mean retained) "
             "| worst task retained % | supported change (points) | time s | peak RSS MiB |",
             "|---|" + "---:|" * (len(tasks) + 7)]

    def mean_retained(row: dict[str, Any]) -> float:
        return statistics.mean(row["retained"][t] for t in tasks) * 100

    for label, key in labels.items():
        if key is None:
            cells = [_mean([s["own"][t] for s in seeds]) + " (100)" for t in tasks]
            mean = _mean([statistics.mean(s["own"][t] for t in tasks) for s in seeds])
            lines.append(f"| {label} | {' | '.join(cells)} | {mean} | 100 | - | 100 | - | - | - |")
            if all(s.get("single") for s in seeds):
                lines.append(single_line(seeds, tasks))
            continue
        ran = [s for s in seeds if key == "best" or key in s["rows"]]
        rows = [s["rows"][s["best"] if key == "best" else key] for s in ran]
        cells = [f"{_mean([r['accuracy'][t] for r in rows])} ({_mean([r['retained'][t] for r in rows], 100)})"
                 for t in tasks]
        mean = _mean([statistics.mean(r["accuracy"][t] for t in tasks) for r in rows])
        retained = _mean([mean_retained(r) for r in rows])
        gains = [mean_retained(r) - mean_retained(s["rows"]["task-arithmetic"])
                 for s, r in zip(ran, rows, strict=True) if "task-arithmetic" in s["rows"]]
        gain = ("+" if statistics.mean(gains) >= 0 else "") + _mean(gains) if gains else "-"
        worst = _mean([min(r["retained"].values()) for r in rows], 100)
        worst_names = ", ".join(dict.fromkeys(short(r["worst_task"]) for r in rows))
        support = "; ".join(f"{short(t)} {_mean([r['support_change'][t] for r in rows])}"
                            for t in rows[0]["support_change"])
        name = f"{label} ({', '.join(dict.fromkeys(s['best'] for s in seeds))})" if key == "best" else label
        if len(ran) < len(seeds):
            name += f" (seed{'s' if len(ran) > 1 else ''} {', '.join(str(s['seed']) for s in ran)} only)"
        lines.append(f"| {name} | {' | '.join(cells)} | {mean} | {retained} | {gain} | {worst} ({worst_names}) | "
                     f"{support} | {_mean([r['seconds'] for r in rows])} | {_mean([r['peak_rss'] for r in rows])} |")
    return lines


def single_line(seeds: list[dict[str, Any]], tasks: list[str]) -> str:
    """The row of the single-task PAINT patches (one model per task, each under the rule by itself)."""
    singles = [s["single"] for s in seeds]
    cells = [f"{_mean([r['accuracy'][t] for r in singles])} ({_mean([r['retained'][t] for r in singles], 100)})"
             for t in tasks]
    mean = _mean([statistics.mean(r["accuracy"][t] for t in tasks) for r in singles])
    retained = _mean([statistics.mean(r["retained"][t] for t in tasks) for r in singles], 100)
    worst = _mean([min(r["retained"][t] for t in tasks) for r in singles], 100)
    names = ", ".join(dict.fromkeys(short(min(tasks, key=lambda t, r=r: r["retained"][t])) for r in singles))
    support = "; ".join(f"{short(t)} {_mean([r['support_change'][t] for r in singles])} (the worst of the "
                        f"{len(tasks)})" for t in singles[0]["support_change"])
    gains = [statistics.mean(s["single"]["retained"][t] - s["rows"]["task-arithmetic"]["retained"][t]
                             for t in tasks) * 100 for s in seeds if "task-arithmetic" in s["rows"]]
    gain = ("+" if statistics.mean(gains) >= 0 else "") + _mean(gains) if gains else "-"
    return (f"| each task's own PAINT patch ({len(tasks)} models, same rule) | {' | '.join(cells)} | {mean} | "
            f"{retained} | {gain} | {worst} ({names}) | {support} | - | - |")


# ---- memory against the number of runs ----------------------------------------------------------------------------

def memory_files(folder: Path, count: int) -> Path:
    """A ViT-B/32 image encoder (random init, seeded) and `count` fine-tunes of it (base + 0.01 noise), once."""
    import torch
    from safetensors.torch import save_file

    from patcher.models import load_clip

    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = {f"visual.{k}": v.contiguous() for k, v in load_clip("ViT-B-32").model.visual.state_dict().items()}
    save_file(base, str(folder / "base.safetensors"))
    for number in range(count):
        generator = torch.Generator().manual_seed(number + 1)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()},
                  str(folder / f"run{number}.safetensors"))
    (folder / "done").write_text("ok\n")
    return folder


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Merge `count` runs' task vectors (streamed from files, or all loaded first) and make one candidate model."""
    from safetensors.torch import load_file

    from patcher.patching.merge_methods import get_method
    from patcher.patching.sources import FileVectors, StateVectors, TensorFile, materialise

    folder, count = Path(spec["folder"]), int(spec["count"])
    base = load_file(str(folder / "base.safetensors"))
    method = get_method(spec["method"])
    started = time.perf_counter()
    with PeakMemory() as memory:
        paths = [folder / f"run{number}.safetensors" for number in range(count)]
        if spec["streamed"]:
            vectors = FileVectors(base, [[TensorFile(path)] for path in paths])
        else:
            vectors = StateVectors(base, [load_file(str(path)) for path in paths])
        delta = method.combine(vectors, method.settings(MEMORY_PARAMS.get(method.name))[0], 0)  # type: ignore[misc]
        candidate = materialise(base, delta, 0.5)
        del candidate, delta, vectors
    return {"seconds": round(time.perf_counter() - started, 2), **memory.record()}


def memory_scaling(folder: Path, counts: tuple[int, ...] = (2, 8),
                   methods: tuple[str, ...] = MEMORY_KEYS) -> list[dict[str, Any]]:
    """Peak memory of merging 2 and 8 ViT-B/32-sized task vectors, streamed and loaded (kept in results.json
    there, and reused: delete it to measure again)."""
    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())
    memory_files(folder, max(counts))
    results = []
    for method in methods:
        for streamed in (True, False):
            for count in counts:
                print(f"memory: {method}, {count} runs, {'streamed' if streamed else 'loaded'}", flush=True)
                measured = in_subprocess("memory", {"folder": str(folder), "count": count, "method": method,
                                                    "streamed": streamed})
                results.append({"method": method, "runs": count, "streamed": streamed, **measured})
    write_json(folder / "results.json", results)
    return results


def memory_lines(results: list[dict[str, Any]]) -> list[str]:
    """The scaling table: peak above the process's baseline (base model loaded), and the 8 / 2 ratio."""
    lines = ["| method | task vectors | peak RSS above baseline, 2 runs (MiB) | 8 runs (MiB) | 8 / 2 | seconds 2 / 8 |",
             "|---|---|---:|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in results):
        for streamed in (True, False):
            pick = {r["runs"]: r for r in results if r["method"] == method and r["streamed"] == streamed}
            two, eight = (pick[n]["peak_rss"] - pick[n]["baseline_rss"] for n in (2, 8))
            held = ", ".join(f"{k} {v}" for k, v in MEMORY_PARAMS.get(method, {}).items())
            lines.append(f"| {method}{f' ({held})' if held else ''} | "
                         f"{'streamed (patcher merge)' if streamed else 'all loaded first'} | "
                         f"{two:.0f} | {eight:.0f} | {eight / two:.2f} | {pick[2]['seconds']:.1f} / "
                         f"{pick[8]['seconds']:.1f} |")
    return lines


# ---- report -------------------------------------------------------------------------------------------------------

def plot(seeds: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    """Mean and worst-task retained accuracy per method (bars: mean over seeds; whiskers: min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for s in seeds for m in s["rows"]))
    means = [[statistics.mean(s["rows"][m]["retained"][t] for t in tasks) * 100 for s in seeds if m in s["rows"]]
             for m in methods]
    worsts = [[min(s["rows"][m]["retained"].values()) * 100 for s in seeds if m in s["rows"]] for m in methods]
    figure, axis = plt.subplots(figsize=(max(9.0, 1.1 * len(methods)), 4.5))
    positions = range(len(methods))
    for offset, values, label in ((-0.2, means, "mean retained"), (0.2, worsts, "worst task retained")):
        centre = [statistics.mean(v) for v in values]
        errors = [[c - min(v) for c, v in zip(centre, values, strict=True)],
                  [max(v) - c for c, v in zip(centre, values, strict=True)]]
        axis.bar([p + offset for p in positions], centre, 0.4, yerr=errors, label=label, capsize=3)
    axis.axhline(80, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(list(positions), methods, rotation=25, ha="right")
    axis.set_ylim(bottom=0)
    axis.set_ylabel("% of own fine-tune's test accuracy")
    axis.set_title(f"Merging {len(tasks)} patches: accuracy retained ({len(seeds)} seed(s))")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(result: dict[str, Any]) -> str:
    """bench/results/merging.md."""
    machine, tasks = result["machine"], result["tasks"]
    lines = ["# Merging many patches into one model", "",
             f"Measured {machine['created']} on {machine['cpu']} ({machine['usable_cores']} usable cores, "
             f"load at start {machine['load_average_start']}, no GPU).", "",
             f"Model `{result['model']}`; merged tasks {', '.join(f'`{short(t)}`' for t in tasks)}; supported "
             f"{', '.join(f'`{short(t)}`' for t in result['support'])} (tolerance 1 point); seeds {result['seeds']} "
             "(mean ± std over seeds). Test accuracy (%); retained = merged / the task's own fine-tune; each "
             "method's parameters and coefficient chosen on held-out data under PAINT's rule "
             f"(`patcher merge --method M --search {result['search']}`). Time and peak RSS: the whole "
             "`patcher merge` process (data, evaluation "
             "of every setting, test)."
             + (f" The layer-wise methods ran {result['layerwise_steps']} optimiser steps (the registry's default "
                "is 60) to fit the machine's time." if result.get("layerwise_steps") else ""), ""]
    lines += table(result["per_seed"], tasks)
    lines += ["", "Chosen per seed: " + "; ".join(
        f"seed {seed}: " + ", ".join(f"{m} {row['params'] or ''} c={row['coefficient']:g}".replace("  ", " ")
                                     for m, row in s["rows"].items())
        for seed, s in zip(result["seeds"], result["per_seed"], strict=True)), ""]
    lines += ["## Without the guard (held-out data, a diagnostic)", "",
              "The same searches' evaluated coefficients with the supported task ignored, as the papers measure "
              "(no supported task): the best held-out mean retained share and that coefficient's worst task. "
              "Coarse (only the coefficients the search visited, the chosen setting's) and on held-out data, "
              "not test; nothing here chose a model.", "",
              "| method | seeds | coefficient | held-out mean retained % | worst task retained % |",
              "|---|---|---|---:|---:|"]
    for method in dict.fromkeys(m for s in result["per_seed"] for m in s["rows"]):
        rows = [(s["seed"], s["rows"][method]["unguarded"]) for s in result["per_seed"] if method in s["rows"]]
        lines.append(f"| {method} | {', '.join(str(seed) for seed, _ in rows)} | "
                     f"{', '.join(format(u['coefficient'], 'g') for _, u in rows)} | "
                     f"{_mean([u['mean_retained'] for _, u in rows], 100)} | "
                     f"{_mean([u['worst_retained'] for _, u in rows], 100)} |")
    lines.append("")
    if result.get("memory"):
        lines += ["## Memory against the number of runs", "",
                  "A ViT-B/32 image encoder (87.8M parameters, random init) and 8 fine-tunes of it on disk; each "
                  "measurement in a fresh process: the merged task vector and one candidate model, peak RSS above "
                  "the process's baseline with the base model loaded.", ""]
        lines += memory_lines(result["memory"])
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the table (and the memory scaling) and write bench/results/merging.*."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="patcher-reference", help="open_clip model (default: the shipped one)")
    parser.add_argument("--tasks", default=",".join(MINI_EIGHT),
                        help="comma-separated patch tasks (default: the mini-8 suite; digits-inverted: generated "
                             "here from digits)")
    parser.add_argument("--support", default="fashion-mnist", help="comma-separated supported tasks")
    parser.add_argument("--runs", nargs="*", type=Path, help="fine-tuned runs to merge instead of building them")
    parser.add_argument("--suite-runs", type=Path,
                        help="bench/suite.py's --runs-dir: each seed merges its own runs, DIR/seed-S/TASK")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--search", default="golden", choices=["golden", "grid"],
                        help="the coefficient's search for each setting (golden: about half the evaluations)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure peak memory of merging 8 runs against 2 (ViT-B/32-sized)")
    parser.add_argument("--layerwise-steps", type=int,
                        help="optimiser steps of the layer-wise methods (default: the registry's)")
    parser.add_argument("--assemble", action="store_true",
                        help="only read back finished merges (as --reuse) and leave the others out of the table")
    parser.add_argument("--reuse", action="store_true",
                        help="read back merges this bench already finished (same runs, support, search) instead of "
                             "redoing them")
    parser.add_argument("--memory-methods", default=",".join(MEMORY_KEYS),
                        help="the methods whose memory against the number of runs is measured")
    parser.add_argument("--notes", type=Path, help="a markdown file appended to merging.md (the reading of the table)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-merging"))
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    runs_dir = args.runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    support = [t for t in args.support.split(",") if t]
    model = runs_model(args.runs) if args.runs else args.model
    tasks = [resolve_task(t, runs_dir) for t in args.tasks.split(",") if t]
    machine = {**machine_info(), "created": now_iso()}
    per_seed = []
    for seed in args.seeds:
        if args.suite_runs:
            runs = [args.suite_runs / f"seed-{seed}" / task for task in tasks]
        else:
            runs = args.runs or build_runs(model, tasks, support, seed, runs_dir)
        fixed = {m: {"steps": args.layerwise_steps} for m in ("layerwise", "layerwise-labelled")
                 if args.layerwise_steps}
        per_seed.append(one_seed(runs, support, seed, args.methods.split(","), runs_dir / "merged", args.search,
                                 args.reuse, fixed, args.assemble))
    merged_tasks = list(per_seed[0]["own"])
    result = {"model": model, "tasks": merged_tasks, "support": support, "seeds": args.seeds, "search": args.search,
              "layerwise_steps": args.layerwise_steps,
              "machine": machine,
              "per_seed": per_seed,
              "memory": memory_scaling(runs_dir / "memory", methods=tuple(args.memory_methods.split(",")))
              if args.memory else None}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.results_dir / "merging.json", result)
    plot(per_seed, merged_tasks, args.results_dir / "merging.png")
    notes = "\n" + args.notes.read_text() if args.notes else ""
    (args.results_dir / "merging.md").write_text(markdown(result) + notes)
    print((args.results_dir / "merging.md").read_text())


def runs_model(runs: list[Path]) -> str:
    """The base model the given runs were built from."""
    from patcher.runs.manifest import load_run

    return load_run(runs[0]).manifest.model.name


def resolve_task(name: str, runs_dir: Path) -> str:
    """A task name; `digits-inverted` becomes the folder task generated from digits (bench/methods.py's)."""
    if name != "digits-inverted":
        return name
    sys.path.insert(0, str(Path(__file__).parent))
    from methods import make_inverted_digits  # bench/methods.py

    return make_inverted_digits(runs_dir / "data" / "digits-inverted")


if __name__ == "__main__":
    main()
