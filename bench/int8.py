"""int8 against float32 in process (onnxruntime), on the demo's run and on a ViT-B-32-shaped encoder at 224 px.

    .venv/bin/python bench/int8.py [--run runs/demo-digits-...] [--rounds 5] [--window 3]

What `patcher export --int8` writes (dynamic quantisation: int8 weights, activations quantised per batch at
run time) is measured beside static QDQ quantisation calibrated on held-out images of every task (what the
issue proposed), so the choice is on record: images/s at batch 1 and 16, every variant of a model measured
in interleaved windows within one run (ratios side by side, min-max over rounds), and test accuracy of the
demo's run per task. Writes bench/results/int8-<cpu>.{json,md} (cpu: amx, avx512-vnni, avx-vnni or avx2).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from patcher.base.files import write_json, write_text
from patcher.benchmark.accuracy import test_images
from patcher.benchmark.machine import machine_info
from patcher.export.contract import logits_output
from patcher.export.graph import ExportGraph
from patcher.export.heldout import load_heldout
from patcher.export.trace import export_onnx, save_onnx
from patcher.export.variants import to_int8
from patcher.models import load_clip
from patcher.models.classifier import MultiHeadClassifier
from patcher.runs.manifest import load_run
from patcher.runs.weights import verified_config
from patcher.stages.export import ExportOptions, export_run

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 16)


def to_static_qdq(source: Path, target: Path, calibration: np.ndarray) -> Path:
    """Static QDQ quantisation calibrated on `calibration` images (MinMax, per-channel weights): the alternative."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = target.with_suffix(".prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    prepared.unlink()
    return target


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session with its default threads (every usable core)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def throughput(variants: dict[str, Path], image_size: tuple[int, int], rounds: int, window_s: float) -> dict:
    """images/s of each variant at each batch size: rounds of interleaved windows; median, min and max."""
    sessions = {name: session(path) for name, path in variants.items()}
    results: dict[str, Any] = {}
    for batch in BATCHES:
        images = np.random.default_rng(batch).standard_normal((batch, 3, *image_size)).astype(np.float32)
        rates: dict[str, list[float]] = {name: [] for name in sessions}
        for active in sessions.values():
            active.run(None, {"image": images})  # warm-up
        for number in range(rounds):
            order = list(sessions) if number % 2 == 0 else list(reversed(sessions))  # ABBA
            for name in order:
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < window_s:
                    sessions[name].run(None, {"image": images})
                    done += batch
                rates[name].append(done / (time.perf_counter() - start))
        base = rates["fp32"]
        results[str(batch)] = {
            name: {"images_per_s": round(statistics.median(values), 2),
                   "ratio_to_fp32": round(statistics.median(v / b for v, b in zip(values, base, strict=True)), 3),
                   "ratio_min": round(min(v / b for v, b in zip(values, base, strict=True)), 3),
                   "ratio_max": round(max(v / b for v, b in zip(values, base, strict=True)), 3)}
            for name, values in rates.items()
        }
    return results


def vit_b32_variants(folder: Path) -> dict[str, Path]:
    """A ViT-B-32-shaped classifier (open_clip config, random weights, a 10-class head) at 224 px, three ways."""
    torch.manual_seed(0)
    loaded = load_clip("ViT-B-32", None)
    head = torch.nn.functional.normalize(torch.randn(loaded.embed_dim, 10), dim=0) * 100
    graph = ExportGraph(MultiHeadClassifier(loaded.model.visual, {"task": head})).eval()
    fp32 = folder / "vit-b-32.onnx"
    save_onnx(export_onnx(graph, folder / ".traced.onnx", (224, 224), 17), fp32)
    int8 = folder / "vit-b-32-int8.onnx"
    to_int8(fp32, int8)
    calibration = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
    return {"fp32": fp32, "int8 dynamic": int8,
            "int8 static QDQ": to_static_qdq(fp32, folder / "vit-b-32-qdq.onnx", calibration)}


def demo_variants(run_path: Path, folder: Path) -> tuple[dict[str, Path], Any]:
    """The demo run's patched classifier: fp32 and int8 as `patcher export --int8` writes them, and static QDQ
    calibrated on the held-out images the export's parity check uses."""
    export = export_run(run_path, ExportOptions(out=folder / "onnx", int8=True))
    run = load_run(run_path)
    heldout = load_heldout(run.tasks, verified_config(run)["preprocess_cfg"], 256)
    qdq = to_static_qdq(export / "patched.onnx", folder / "patched-qdq.onnx", heldout.images.numpy())
    return {"fp32": export / "patched.onnx", "int8 dynamic": export / "patched_int8.onnx",
            "int8 static QDQ": qdq}, run


def accuracies(variants: dict[str, Path], run: Any) -> dict[str, dict[str, float]]:
    """Test accuracy (%) of each variant on every task of the run (whole test splits)."""
    results: dict[str, dict[str, float]] = {name: {} for name in variants}
    for task in run.tasks:
        images, labels, _ = test_images(run, task, None)
        for name, path in variants.items():
            active = session(path)
            predicted = np.concatenate([active.run([logits_output(task)], {"image": images[i : i + 256]})[0]
                                        .argmax(axis=1) for i in range(0, len(images), 256)])
            results[name][task] = round(float((predicted == labels).mean() * 100), 2)
    return results


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    machine = report["machine"]
    lines = ["# int8 against float32 in process (onnxruntime)", "",
             f"{report['created']}, {machine['cpu']} ({machine['usable_cores']} usable cores, flags: "
             f"{', '.join(report['cpu_flags']) or 'no AVX-512, VNNI or AMX'}), onnxruntime {ort.__version__}, "
             f"load average at start {machine['load_average_start']}. "
             f"Median images/s over {report['rounds']} rounds of {report['window_s']} s windows, interleaved ABBA; "
             "ratio to float32 median (min to max over rounds).", ""]
    for model, figures in report["throughput"].items():
        lines += [f"## {model}", "", "| variant | batch 1 img/s | x fp32 | batch 16 img/s | x fp32 |",
                  "|---|---:|---:|---:|---:|"]
        for name in figures["1"]:
            cells = []
            for batch in ("1", "16"):
                entry = figures[batch][name]
                cells += [f"{entry['images_per_s']:.1f}",
                          f"{entry['ratio_to_fp32']:.2f} ({entry['ratio_min']:.2f}-{entry['ratio_max']:.2f})"]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines.append("")
    lines += ["## Test accuracy of the demo's run (%)", "", "| variant | " + " | ".join(report["tasks"]) + " |",
              "|---|" + "---:|" * len(report["tasks"])]
    for name, values in report["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[t]:.2f}" for t in report["tasks"]) + " |")
    return "\n".join(lines) + "\n"


def cpu_flags() -> list[str]:
    """The CPU features int8 kernels use, as /proc/cpuinfo lists them."""
    wanted = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16", "avx512bw")
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return [flag for flag in wanted if flag in flags]


def cpu_tag(flags: list[str]) -> str:
    """A short name for the int8 kernels a CPU has: amx, avx512-vnni, avx-vnni, or avx2."""
    for flag, tag in (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni")):
        if flag in flags:
            return tag
    return "avx2"


def main() -> None:
    """Measure, then write bench/results/int8-<cpu>.json and .md (one pair per CPU kind measured)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="the demo's run (default: the newest runs/demo-*)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=3.0)
    args = parser.parse_args()
    run_path = args.run or sorted(Path("runs").glob("demo-digits-*"))[-1]
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="patcher-int8-") as work:
        folder = Path(work)
        demo, run = demo_variants(run_path, folder)
        vit = vit_b32_variants(folder)
        size = tuple(run.manifest.model.preprocess.image_size)
        report = {
            "format": "patcher-bench-int8/1", "created": time.strftime("%Y-%m-%d"), "machine": machine,
            "cpu_flags": cpu_flags(), "rounds": args.rounds, "window_s": args.window, "run": str(run_path),
            "throughput": {"demo model (patcher-mini, 28 px)": throughput(demo, size, args.rounds, args.window),
                           "ViT-B-32-shaped (random weights, 224 px)": throughput(vit, (224, 224), args.rounds,
                                                                                   args.window)},
            "tasks": run.tasks, "accuracy": accuracies(demo, run),
        }
    RESULTS.mkdir(exist_ok=True)
    name = f"int8-{cpu_tag(report['cpu_flags'])}"
    write_json(RESULTS / f"{name}.json", report)
    write_text(RESULTS / f"{name}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
