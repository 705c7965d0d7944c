"""The GPU check's measurements (bench/gpu_check.py runs them): each phase goes through patcher's own code paths.

A `Plan` says what to measure on a GPU and, for `--cpu-smoke`, the same phases on the tiny model in seconds. A
phase that fails records its error and the rest go on; one the time budget no longer fits is skipped.
"""

from __future__ import annotations

import gc
import json
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIGS = {"plain": (1, False), "checkpointing": (1, True), "accum4": (4, False), "checkpointing+accum4": (4, True)}


@dataclass(frozen=True)
class Shape:
    """One model shape to fine-tune and run: an open_clip config name, its image size and the training batch."""

    model: str
    image_size: int | None
    batch: int


@dataclass(frozen=True)
class Plan:
    """What the check measures: sizes on a GPU, or the same phases small on a CPU."""

    device: str
    shapes: tuple[Shape, ...]
    timed_steps: int
    warm_steps: int
    eval_images: int
    build: Shape  # the model `patcher build` fine-tunes on digits, exported and served after
    build_steps: int
    infer_batches: tuple[int, ...]
    seconds: float  # per in-process or served measurement
    triton_concurrency: dict[int, int] = field(default_factory=dict)
    budget_s: float = 480.0


GPU_PLAN = Plan("cuda", (Shape("ViT-B-32", 224, 256), Shape("ViT-L-14", 224, 128)), timed_steps=5, warm_steps=2,
                eval_images=4096, build=Shape("ViT-B-32", 224, 128), build_steps=30, infer_batches=(1, 64, 256),
                seconds=2.0, triton_concurrency={1: 4, 64: 2, 256: 2}, budget_s=480.0)
CPU_PLAN = Plan("cpu", (Shape("patcher-tiny", None, 16),), timed_steps=1, warm_steps=1, eval_images=64,
                build=Shape("patcher-tiny", None, 16), build_steps=4, infer_batches=(1, 8), seconds=0.3,
                triton_concurrency={1: 1, 8: 1}, budget_s=240.0)


class Phases:
    """Runs phases in order within the budget; each record holds its seconds and either figures or an error."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.perf_counter() + budget_s
        self.records: dict[str, dict[str, Any]] = {}

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.deadline - time.perf_counter()

    def run(self, name: str, phase: Callable[[], dict[str, Any]], needs_s: float = 0.0) -> dict[str, Any]:
        """Run one phase unless fewer than `needs_s` seconds are left; its record."""
        if self.left() < needs_s:
            self.records[name] = {"skipped": f"{self.left():.0f} s of the budget left, {needs_s:.0f} s needed"}
            return self.records[name]
        started = time.perf_counter()
        print(f"gpu check: {name} ...", flush=True)
        try:
            record = phase()
        except Exception as error:  # a phase's failure is a finding of the check, not its end
            lines = traceback.format_exc().strip().splitlines()
            record = {"error": f"{type(error).__name__}: {str(error)[:2000]}", "traceback": lines[-12:]}
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.records[name] = record
        print(f"gpu check: {name} done in {record['seconds']} s{' (error)' if 'error' in record else ''}", flush=True)
        return record


def _free(device: str) -> None:
    """Drop what the last model left (CUDA's cache too), so the next one's peak is its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _image_size(loaded: Any) -> tuple[int, int]:
    size = loaded.preprocess_cfg["size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def machine(device: str) -> dict[str, Any]:
    """The CPU side (patcher.benchmark.machine) and the GPU: name, memory, capability, driver, CUDA, providers."""
    from patcher.benchmark.machine import machine_info
    from patcher.export.providers import available_providers

    record: dict[str, Any] = {"host": machine_info(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                              "onnxruntime_providers": available_providers()}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        record.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                      capability=f"{properties.major}.{properties.minor}",
                      multiprocessors=properties.multi_processor_count,
                      bf16=torch.cuda.is_bf16_supported())
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, check=False)
        record["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
    return record


def _fine_tune(loaded: Any, shape: Shape, config: str, plan: Plan) -> dict[str, Any]:
    """Warm-up steps, then timed steps of patcher's `ft` through its training loop (AMP on CUDA) on random images."""
    from patcher.data.items import TensorItems
    from patcher.data.prepared_splits import TrainSplit
    from patcher.data.tasks import get_task
    from patcher.training.config import TrainConfig
    from patcher.training.loop import MethodTracking, precision_name, train_method
    from patcher.training.methods import MethodSetup
    from patcher.training.methods.ft import FineTune

    cuda = plan.device.startswith("cuda")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape.batch, 3, *_image_size(loaded), generator=generator)
    labels = torch.randint(10, (shape.batch,), generator=generator)
    head = torch.nn.functional.normalize(torch.randn(loaded.embed_dim, 10, generator=generator), dim=0) * 100
    accum, checkpointing = CONFIGS[config]
    train = TrainConfig(steps=plan.warm_steps + plan.timed_steps, batch_size=shape.batch, lr=1e-5, warmup_steps=0,
                        log_every=1, checkpoint_every=10**9, accum_steps=accum, grad_checkpointing=checkpointing)
    split = TrainSplit(TensorItems(images, labels), pin_memory=cuda)  # what prepare_splits sets on CUDA
    setup = MethodSetup(loaded, {"task": split}, {"task": get_task("digits")}, {"task": head.to(plan.device)},
                        train, plan.device)
    speeds: list[float] = []

    def after_step(line: dict[str, Any]) -> None:
        if line["step"] == plan.warm_steps and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif line["step"] > plan.warm_steps:
            speeds.append(line["images_per_s"])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_method(FineTune(setup, None), plan.device, MethodTracking(on_log=after_step))
    record = {"config": config, "accum_steps": accum, "grad_checkpointing": checkpointing,
              "precision": precision_name(plan.device), "images_per_s": round(float(np.median(speeds)), 2),
              "images_per_s_steps": speeds}
    if cuda:
        record["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


def training(plan: Plan) -> dict[str, Any]:
    """Every shape x configuration; an out-of-memory configuration is recorded as such and the others go on."""
    from patcher.models import load_clip

    shapes = []
    for shape in plan.shapes:
        torch.manual_seed(0)
        loaded = load_clip(shape.model, None, shape.image_size, device=plan.device)
        runs = []
        for config in CONFIGS:
            try:
                runs.append(_fine_tune(loaded, shape, config, plan))
            except torch.cuda.OutOfMemoryError as error:
                runs.append({"config": config, "error": f"out of memory: {str(error).splitlines()[0][:300]}"})
            _free(plan.device)
        base = next((run for run in runs if run["config"] == "plain" and "error" not in run), None)
        for run in runs:
            if base is not None and "error" not in run:
                run["speed_vs_plain"] = round(run["images_per_s"] / base["images_per_s"], 3)
                if "max_memory_allocated_mib" in run:
                    peak = run["max_memory_allocated_mib"] / base["max_memory_allocated_mib"]
                    run["memory_vs_plain"] = round(peak, 3)
        shapes.append({**asdict(shape), "trained_parameters": sum(p.numel() for p in loaded.model.visual.parameters()),
                       "runs": runs})
        del loaded
        _free(plan.device)
    return {"shapes": shapes}


def evaluation(plan: Plan) -> dict[str, Any]:
    """Held-out evaluation throughput: patcher.data.evaluation.accuracies (bf16 on CUDA) over an in-RAM image store."""
    from patcher.data.evaluation import Scorer, accuracies
    from patcher.data.image_store import ImageStore
    from patcher.data.transforms import Normalize
    from patcher.models import load_clip
    from patcher.models.classifier import MultiHeadClassifier

    results = []
    for shape in plan.shapes:
        loaded = load_clip(shape.model, None, shape.image_size, device=plan.device)
        height, width = _image_size(loaded)
        rng = np.random.default_rng(0)
        store = ImageStore(labels=rng.integers(0, 10, plan.eval_images), height=height, width=width,
                           array=rng.integers(0, 256, (plan.eval_images, height, width, 3), dtype=np.uint8))
        head = torch.nn.functional.normalize(torch.randn(loaded.embed_dim, 10), dim=0) * 100
        classifier = MultiHeadClassifier(loaded.model.visual, {"task": head})
        normalize = Normalize(loaded.preprocess_cfg)
        scorer = Scorer(classifier=classifier, normalize=normalize, batch_size=256, device=plan.device)
        accuracies(scorer, {"task": store})  # warm-up
        started = time.perf_counter()
        accuracy = accuracies(scorer, {"task": store})
        seconds = time.perf_counter() - started
        results.append({"model": shape.model, "images": plan.eval_images, "batch_size": 256,
                        "images_per_s": round(plan.eval_images / seconds, 1), "accuracy_random": accuracy["task"]})
        del loaded, classifier, scorer
        _free(plan.device)
    return {"runs": results}


def pipeline(plan: Plan, workdir: Path) -> dict[str, Any]:
    """`patcher build` (digits, random weights) and `patcher export` on this device, then parity on the device."""
    from patcher.export.graph import load_graph, reference_outputs
    from patcher.export.heldout import load_heldout
    from patcher.export.verify import TorchReference, parity_report
    from patcher.runs.manifest import load_run
    from patcher.runs.weights import verified_config, verified_weights
    from patcher.stages.build import BuildOptions, build
    from patcher.stages.export import ExportOptions, export_run
    from patcher.training.config import TrainConfig

    shape = plan.build
    train = TrainConfig(steps=plan.build_steps, batch_size=shape.batch, lr=1e-4, warmup_steps=2,
                        checkpoint_every=10**9, eval_every=max(1, plan.build_steps // 2))
    started = time.perf_counter()
    run_dir = build(BuildOptions(task="digits", model=shape.model, pretrained=None, image_size=shape.image_size,
                                 alpha="auto", train_config=train, device=plan.device, out=workdir / "run"))
    built = time.perf_counter() - started
    export_dir = export_run(Path(run_dir), ExportOptions(text=False))
    exported = time.perf_counter() - started - built
    run = load_run(Path(run_dir))
    config = verified_config(run)
    graph = load_graph(config, verified_weights(run, "patched", run.tasks), run.tasks).to(plan.device)
    heldout = load_heldout(run.tasks, config["preprocess_cfg"], 256)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # exact float32 on both sides
        reference = reference_outputs(graph, heldout.images.to(plan.device))
    report = parity_report(Path(export_dir) / "patched.onnx", "fp32", heldout, TorchReference.of(graph, reference),
                           device=plan.device)
    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    evaluations = manifest.get("training", {}).get("evaluations", [])
    return {"run": str(run_dir), "export": str(export_dir), "build_s": round(built, 2), "export_s": round(exported, 2),
            "alpha": manifest.get("alpha", {}).get("chosen"), "test_accuracy": manifest.get("test_accuracy"),
            "held_out_evaluations": evaluations, "parity_on_device": {
                key: report[key] for key in ("images", "batch_sizes", "max_abs_diff", "top1_agreement", "problems",
                                             "passed")}}


def _timed(runner: Callable[[], object], batch: int, seconds: float) -> dict[str, Any]:
    from patcher.benchmark.inprocess import measure

    load = measure(runner, seconds, 10**6, warmup_calls=3)
    return {"images_per_s": round(batch * load.succeeded / load.elapsed_s, 1),
            "p50_ms": round(float(np.median(load.latencies_s)) * 1e3, 3), "calls": load.succeeded}


def _graph_onnx(shape: Shape, device: str, folder: Path) -> tuple[Any, Path]:
    """A random-weight classifier graph of a shape (a 10-class head) and its ONNX file, traced as `patcher export`
    traces."""
    from patcher.export.graph import ExportGraph
    from patcher.export.trace import export_onnx, save_onnx
    from patcher.models import load_clip
    from patcher.models.classifier import MultiHeadClassifier

    loaded = load_clip(shape.model, None, shape.image_size, device="cpu")
    head = torch.nn.functional.normalize(torch.randn(loaded.embed_dim, 10), dim=0) * 100
    graph = ExportGraph(MultiHeadClassifier(loaded.model.visual, {"task": head})).eval()
    path = folder / f"{shape.model}.onnx"
    save_onnx(export_onnx(graph, path, _image_size(loaded), 17), path)
    return graph.to(device), path


def inference(plan: Plan, workdir: Path, phases: Phases) -> dict[str, Any]:
    """onnxruntime (CUDA; TensorRT where it loads) against PyTorch (fp32 and bf16 autocast), host memory in and out,
    at each batch size, for every shape (random weights, traced as `patcher export` traces)."""
    from patcher.export.providers import active_provider, open_session

    cuda = plan.device.startswith("cuda")
    rows, notes = [], []
    for shape in plan.shapes:
        if phases.left() < 60 and rows:
            notes.append(f"{shape.model}: skipped, {phases.left():.0f} s of the budget left")
            continue
        graph, path = _graph_onnx(shape, plan.device, workdir)
        size = image_size_of(path)
        kinds = _runners(graph, path, plan, size, tensorrt=phases.left() > 240)  # an engine build takes minutes
        if cuda:
            try:
                notes.append(f"{shape.model}: onnxruntime runs on {active_provider(open_session(path, plan.device))}")
            except Exception as error:  # no CUDA provider: the rows below say so too
                notes.append(f"{shape.model}: onnxruntime on the GPU: {type(error).__name__}: {str(error)[:300]}")
        for batch_size in plan.infer_batches:
            batch = np.random.default_rng(0).standard_normal((batch_size, 3, *size)).astype(np.float32)
            for kind, make in kinds.items():
                try:
                    rows.append({"model": shape.model, "batch": batch_size, "kind": kind,
                                 **_timed(make(batch), batch_size, plan.seconds)})
                except Exception as error:  # one provider failing (TensorRT's libraries) leaves the others
                    rows.append({"model": shape.model, "batch": batch_size, "kind": kind,
                                 "error": f"{type(error).__name__}: {str(error)[:300]}"})
        del graph, kinds
        _free(plan.device)
    return {"rows": rows, "notes": notes}


def _runners(graph: Any, path: Path, plan: Plan, size: tuple[int, int], tensorrt: bool
             ) -> dict[str, Callable[[np.ndarray], Callable[[], object]]]:
    """kind -> a factory of the call that runs a batch: PyTorch fp32 (and bf16 autocast on CUDA), onnxruntime on the
    device, and, with `tensorrt`, onnxruntime's TensorRT provider where this build has it (one engine for the batch
    range, cached on disk so that each batch size's session reuses it)."""
    from patcher.benchmark.inprocess import onnxruntime_runner, torch_runner
    from patcher.export.providers import TENSORRT, available_providers

    kinds: dict[str, Callable[[np.ndarray], Callable[[], object]]] = {
        "torch fp32": lambda batch: torch_runner(graph, batch, plan.device),
        "onnxruntime": lambda batch: onnxruntime_runner(path, batch, 0, plan.device)}
    if plan.device.startswith("cuda"):
        kinds["torch bf16"] = lambda batch: torch_runner(graph, batch, plan.device, bf16=True)
        if tensorrt and TENSORRT in available_providers():
            profile: dict[str, Any] = {f"trt_profile_{k}_shapes": f"image:{b}x3x{size[0]}x{size[1]}"
                                       for k, b in (("min", 1), ("opt", 64), ("max", max(plan.infer_batches)))}
            profile.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(path.parent / "trt-cache"))
            kinds["onnxruntime tensorrt"] = lambda batch: onnxruntime_runner(path, batch, 0, plan.device, profile)
    return kinds


def image_size_of(path: Path) -> tuple[int, int]:
    """Height and width of an exported classifier's image input."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value), int(dims[3].dim_value)


def run_check(cpu_smoke: bool, budget_s: float | None, setup_s: float | None) -> dict[str, Any]:
    """Every phase of the plan for this machine; the report the results files are written from."""
    cuda = torch.cuda.is_available() and not cpu_smoke
    plan = GPU_PLAN if cuda else CPU_PLAN
    phases = Phases(budget_s or plan.budget_s)
    info = phases.run("machine", lambda: machine(plan.device))
    with tempfile.TemporaryDirectory(prefix="patcher-gpu-check-") as folder:
        workdir = Path(folder)
        phases.run("training", lambda: training(plan), needs_s=30)
        phases.run("evaluation", lambda: evaluation(plan), needs_s=20)
        built = phases.run("build_export_parity", lambda: pipeline(plan, workdir), needs_s=30)
        export_dir = Path(built["export"]) if "export" in built else None
        phases.run("inference", lambda: inference(plan, workdir, phases), needs_s=30)
        if export_dir is not None:
            from gpu_serving import triton  # bench/gpu_serving.py

            phases.run("triton", lambda: triton(plan, export_dir, workdir), needs_s=20)
        else:
            phases.records["triton"] = {"skipped": "no export (build_export_parity failed)"}
    device = info.get("gpu") or f"cpu-smoke-{info.get('host', {}).get('cpu', 'cpu')}"
    slug = "-".join(part for part in "".join(c if c.isalnum() else "-" for c in device.lower()).split("-") if part)
    return {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device, "device_slug": slug,
            "cpu_smoke": not cuda, "plan": asdict(plan), "setup_s": setup_s, "phases": phases.records}
