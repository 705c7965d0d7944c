"""Peak memory and step time of fine-tuning steps with and without gradient checkpointing and accumulation.

    .venv/bin/python bench/finetune_memory.py                          # ViT-B-32, 224 px, batch 32 (the README's)
    .venv/bin/python bench/finetune_memory.py --model ViT-L-14 --batches 2,4 --configs plain,checkpointing \\
        --steps 1 --name finetune-memory-vit-l-14                      # the per-image figures behind its estimate

Each (configuration, batch, round) runs in a fresh subprocess, so that no run's peak hides another's: a
random-weight open_clip model (`open_clip.create_model(name)`, no pretrained weights), patcher's `ft` method
through patcher's training loop (AdamW, clipping; `--accum-steps`, `--grad-checkpointing` as the build sets
them) on random images of a 10-class task: one warm-up step, then the timed steps. Memory is read from the
kernel, on CPU: the resident set at rest after the warm-up step (weights and AdamW's two moments; gradients
freed, as the loop frees them when a step starts) and its peak over the timed steps (VmHWM, reset through
/proc/self/clear_refs after the warm-up step; glibc's mmap threshold fixed at 128 KiB so that freed activations
go back to the kernel); their difference is what a step adds: the activations kept for the backward pass, and
the gradients. What the forward pass holds for the backward pass (activations) is read at the end of the
forward pass of each step's first (micro-)batch, no gradients being held then. On CUDA the same figures come
from torch.cuda's allocator statistics.
Step time: the loop's own images/s over the timed steps. Configurations of one batch size run in turn within
each round, so ratios are measured side by side.
Writes bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> (accum_steps, grad_checkpointing)
    "plain": (1, False),
    "checkpointing": (1, True),
    "accum4": (4, False),
    "checkpointing+accum4": (4, True),
}
MMAP_THRESHOLD = str(128 * 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(model: str, image_size: int, batch: int, config: str, steps: int, device: str) -> dict[str, Any]:
    """One configuration in this process: memory at rest and at peak (MB), seconds per timed step."""
    import torch

    from patcher.data.items import TensorItems
    from patcher.data.prepared_splits import TrainSplit
    from patcher.data.tasks import get_task
    from patcher.models import load_clip
    from patcher.training.config import TrainConfig
    from patcher.training.loop import MethodTracking, train_method
    from patcher.training.methods import MethodSetup
    from patcher.training.methods.ft import FineTune

    torch.manual_seed(0)
    loaded = load_clip(model, None, image_size, device=device)
    accum_steps, checkpointing = CONFIGS[config]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(10, (batch,), generator=generator)
    head = torch.nn.functional.normalize(torch.randn(loaded.embed_dim, 10, generator=generator), dim=0) * 100
    train = TrainConfig(steps=steps + 1, batch_size=batch, lr=1e-5, warmup_steps=0, log_every=1,
                        checkpoint_every=10**9, accum_steps=accum_steps, grad_checkpointing=checkpointing)
    task = get_task("digits")  # ten class names; the images and head above are random
    setup = MethodSetup(loaded, {"task": TrainSplit(TensorItems(images, labels))}, {"task": task},
                        {"task": head}, train, device)
    cuda = device.startswith("cuda")
    marks: dict[str, Any] = {"speeds": []}

    def after_step(line: dict[str, Any]) -> None:
        if line["step"] == 1:  # the warm-up step: AdamW's moments exist now; measure the timed steps from here
            for parameter in loaded.model.parameters():
                parameter.grad = None  # what the loop does first in every step: at rest, no gradients are held
            if cuda:
                torch.cuda.synchronize()
                marks["rest"] = torch.cuda.memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            marks["rest_rss"] = _status_kib("VmRSS") / 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            marks["cpu_start"] = _cpu_seconds()
        else:
            marks["speeds"].append(line["images_per_s"])

    method = FineTune(setup, None)
    step_loss = method.step_loss

    def measured_step_loss(*arguments: Any) -> Any:  # the loss of a (micro-)batch, its graph alive
        loss = step_loss(*arguments)
        first = len(arguments) == 1 or arguments[1].index == 0  # no gradients held yet: the activations alone
        if "rest_rss" in marks and first:
            held = (torch.cuda.memory_allocated() / 2**20 - marks["rest"] if cuda
                    else _status_kib("VmRSS") / 1024 - marks["rest_rss"])
            marks["forward"] = max(marks.get("forward", 0.0), held)
        return loss

    method.step_loss = measured_step_loss  # type: ignore[method-assign]
    trainable = sum(p.numel() for p in loaded.model.visual.parameters())
    train_method(method, device, MethodTracking(on_log=after_step))
    peak_rss = _status_kib("VmHWM") / 1024
    cpu_per_step = (_cpu_seconds() - marks["cpu_start"]) / steps
    result = {
        "model": model, "image_size": image_size, "batch": batch, "config": config, "accum_steps": accum_steps,
        "grad_checkpointing": checkpointing, "device": device, "trained_parameters": trainable,
        "rest_rss_mb": round(marks["rest_rss"], 1), "peak_rss_mb": round(peak_rss, 1),
        "step_rss_mb": round(peak_rss - marks["rest_rss"], 1), "forward_mb": round(marks["forward"], 1),
        "step_s": round(batch / statistics.mean(marks["speeds"]), 3), "step_cpu_s": round(cpu_per_step, 3),
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(rest_cuda_mb=round(marks["rest"], 1), peak_cuda_mb=round(peak, 1),
                      step_cuda_mb=round(peak - marks["rest"], 1))
    return result


def run_one(model: str, image_size: int, batch: int, config: str, steps: int, device: str) -> dict[str, Any]:
    """`measure` in a fresh subprocess (one thread per core, glibc's mmap threshold fixed)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    arguments = json.dumps([model, image_size, batch, config, steps, device])
    command = [sys.executable, __file__, "--child", arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} at batch {batch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]], configs: list[str], batches: list[int]) -> list[dict[str, Any]]:
    """Per (batch, configuration): the median over rounds of each figure, and ratios against `plain`."""
    rows = []
    for batch in batches:
        medians = {}
        for config in configs:
            mine = [run for run in runs if run["batch"] == batch and run["config"] == config]
            keys = [key for key in mine[0] if key.endswith(("_mb", "_s"))]
            medians[config] = {key: round(statistics.median(run[key] for run in mine), 3) for key in keys}
            medians[config]["rounds"] = len(mine)
            medians[config]["step_s_range"] = [min(run["step_s"] for run in mine), max(run["step_s"] for run in mine)]
        base = medians.get("plain")
        for config in configs:
            row = {"batch": batch, "config": config, **medians[config]}
            if base is not None:
                row["peak_ratio"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
                row["step_memory_ratio"] = round(row["step_rss_mb"] / base["step_rss_mb"], 3)
                row["forward_ratio"] = round(row["forward_mb"] / base["forward_mb"], 3)
                row["time_ratio"] = round(row["step_s"] / base["step_s"], 3)
                row["cpu_ratio"] = round(row["step_cpu_s"] / base["step_cpu_s"], 3)
            rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    setting = report["setting"]
    machine = report["machine"]
    lines = [
        f"# Fine-tuning memory: {setting['model']} at {setting['image_size']} px, gradient checkpointing and "
        "accumulation",
        "",
        f"Measured {report['measured']} on {machine['cpu']} ({machine['usable_cores']} usable cores, "
        f"{machine['memory_gib']} GiB, device {setting['device']}); torch {machine['versions'].get('torch')}, "
        f"open_clip {machine['versions'].get('open_clip_torch')}. Random weights (`open_clip.create_model`), "
        f"patcher's `ft` through its training loop (AdamW over the image tower's "
        f"{report['runs'][0]['trained_parameters'] / 1e6:.1f}M parameters), one warm-up step, then "
        f"{setting['steps']} timed step(s); each run in a fresh process, {setting['rounds']} round(s), medians.",
        "",
        "| batch | configuration | resident at rest MB | peak MB | step adds MB | forward holds MB | peak / plain "
        "| step adds / plain | forward holds / plain | s / step (min-max) | time / plain | CPU s / step "
        "| CPU time / plain |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        low, high = row["step_s_range"]
        lines.append(
            f"| {row['batch']} | {row['config']} | {row['rest_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} "
            f"| {row['step_rss_mb']:.0f} | {row['forward_mb']:.0f} | {row.get('peak_ratio', float('nan')):.2f} "
            f"| {row.get('step_memory_ratio', float('nan')):.2f} | {row.get('forward_ratio', float('nan')):.2f} "
            f"| {row['step_s']:.2f} ({low:.2f}-{high:.2f}) | {row.get('time_ratio', float('nan')):.2f} "
            f"| {row['step_cpu_s']:.2f} | {row.get('cpu_ratio', float('nan')):.2f} |")
    lines += [
        "",
        "*Resident at rest*: the process between steps (Python and torch, both towers' weights, AdamW's two moments "
        "of the image tower). *Peak*: the largest resident set during the timed steps (VmHWM). *Step adds*: peak "
        "minus rest, what a step allocates on top: the activations kept for the backward pass, which checkpointing "
        "and accumulation shrink, and the gradients, which they do not "
        f"({report['runs'][0]['trained_parameters'] * 4 / 2**20:.0f} MB in float32). *Forward holds*: what the "
        "forward pass of a step's first (micro-)batch keeps for its backward pass (read when it ends, no gradients "
        "held yet): the activations alone. *s / step*: wall time per step, which other work on a shared machine "
        "stretches (read the cost of a configuration from CPU time when the load average is above the cores); "
        "*CPU s / step*: user + system CPU time of the process per step "
        f"(load average {report['machine']['load_average_start'] or 'not recorded'} as the runs started, "
        f"{report.get('load_average_end')} as they ended). CPU memory here, float32; "
        "on a GPU with bf16 autocast activations take about half as many bytes, weights and optimiser state the "
        "same.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run every configuration and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", default="32", help="comma-separated global batch sizes")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="finetune-memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(measure(*json.loads(arguments.child))))
        return

    from datetime import UTC, datetime

    from patcher.base.files import write_json, write_text
    from patcher.benchmark.machine import load_average, machine_info

    configs = [name.strip() for name in arguments.configs.split(",") if name.strip()]
    batches = [int(batch) for batch in arguments.batches.split(",")]
    machine = machine_info()
    runs = []
    for round_number in range(arguments.rounds):
        for batch in batches:
            for config in configs:
                run = run_one(arguments.model, arguments.image_size, batch, config, arguments.steps, arguments.device)
                run["round"] = round_number
                runs.append(run)
                print(json.dumps(run), flush=True)
    report = {
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_end": load_average(),
        "setting": {"model": arguments.model, "image_size": arguments.image_size, "batches": batches,
                    "configs": configs, "steps": arguments.steps, "rounds": arguments.rounds,
                    "device": arguments.device, "mmap_threshold_bytes": int(MMAP_THRESHOLD)},
        "rows": summarise(runs, configs, batches),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{arguments.name}.json", report)
    write_text(RESULTS / f"{arguments.name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
