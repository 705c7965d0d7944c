"""The `patcher` command line: parse, call one stage function, print. No logic a test would want to call."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from patcher.errors import PatcherError

app = typer.Typer(
    help="Patch one task of a CLIP model without breaking the others, export it to ONNX, serve it with Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(error: PatcherError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(error.exit_code)


Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Download = Annotated[bool, typer.Option(help="Download missing datasets (needs network).")]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="PATCHER_DATA", help="Dataset root (default ~/.cache/patcher/data).")
]


@app.command()
def build(
    task: Annotated[str, typer.Option(help="Task(s) to patch, comma-separated (see `patcher tasks`), or folder:PATH.")],
    support: Annotated[str, typer.Option(help="Comma-separated supported tasks to protect.")] = "",
    model: Annotated[str, typer.Option(help="open_clip model name, or local-dir:DIR.")] = "ViT-B-32",
    pretrained: Annotated[
        str, typer.Option(help="open_clip pretrained tag or checkpoint file; 'none' for random weights.")
    ] = "openai",
    image_size: Annotated[int | None, typer.Option(help="Override the model's input size (pixels).")] = None,
    method: Annotated[str, typer.Option(
        help="Fine-tuning method: ft (encoder through frozen zero-shot heads), lp (linear probe), lpft (probe, then "
             "full fine-tuning), flyp (contrastive, both towers), carft (ft + context KL).")] = "ft",
    param: Annotated[list[str] | None, typer.Option(
        help="Method parameter KEY=VALUE, repeatable: lpft lp_steps/lp_lr/lp_weight_decay, carft kl_weight/"
             "contexts (task or imagenet), flyp same_class_positives.")] = None,
    multi: Annotated[str | None, typer.Option(
        help="Several --task: joint (one fine-tune on the mixture), sequential (task after task) or parallel "
             "(task vectors added, one coefficient). Default joint.")] = None,
    alpha: Annotated[str, typer.Option(help="'auto' (chosen on held-out data) or a value in [0, 1].")] = "auto",
    tolerance: Annotated[float, typer.Option(help="Points of accuracy a supported task may lose.")] = 1.0,
    search: Annotated[str, typer.Option(help="Alpha search: golden (fewer evaluations) or grid (all 11).")] = "golden",
    steps: Annotated[int | None, typer.Option(help="Training steps (default 2000).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Train for this many epochs instead of --steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size (default 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate, AdamW (default 1e-5; lp 1e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default 0.1; lp 0).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup steps (default 500; lp 0).")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Gradient norm clip (default 1.0).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for initialisation and batch order (default 0).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default 500).")] = None,
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<task>-<method>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted build at --out.")] = False,
) -> None:
    """Fine-tune on one or more tasks with a method, interpolate with the zero-shot weights and choose alpha."""
    from rich.console import Console

    from patcher.runs.report import accuracy_table, alpha_lines
    from patcher.runs.store import load_run
    from patcher.stages.build import BuildOptions
    from patcher.stages.build import build as run_build

    try:
        from patcher.training.methods import train_config

        params = dict(_key_value(item) for item in param or [])
        finetune = train_config(method, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                warmup_steps=warmup_steps, grad_clip=grad_clip, seed=seed,
                                checkpoint_every=checkpoint_every)
        options = BuildOptions(
            task=task,
            support=[s.strip() for s in support.split(",") if s.strip()],
            model=model,
            pretrained=None if pretrained.lower() == "none" else pretrained,
            image_size=image_size,
            method=method,
            method_params=params,
            multi=multi,
            alpha=alpha,
            tolerance=tolerance,
            search=search,
            finetune=finetune,
            epochs=epochs,
            data_dir=data_dir,
            download=download,
            device=device,
            out=out,
            resume=resume,
        )
        path = run_build(options)
    except PatcherError as error:
        _fail(error)
    except KeyboardInterrupt:
        hint = f" --out {out} --resume" if out else " with --out DIR (and --resume next time)"
        typer.echo(f"interrupted: rerun the same command{hint} to continue from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    manifest = load_run(path).manifest
    console = Console()
    console.print(accuracy_table(manifest))
    for line in alpha_lines(manifest):
        console.print(line)
    console.print(f"run: {path}")


def _key_value(item: str) -> tuple[str, str]:
    key, separator, value = item.partition("=")
    if not separator or not key.strip():
        raise PatcherError(f"--param {item!r} is not KEY=VALUE: e.g. --param kl_weight=0.5")
    return key.strip(), value.strip()


@app.command()
def merge(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to combine (one base model and architecture).")],
    out: Annotated[Path, typer.Option(help="Directory for the merged run.")],
    support: Annotated[str, typer.Option(help="More comma-separated supported tasks to protect.")] = "",
    tolerance: Annotated[float, typer.Option(help="Points of accuracy a supported task may lose.")] = 1.0,
    alpha: Annotated[str, typer.Option(help="Task-vector coefficient: 'auto' (grid 0..1 on held-out data) "
                                            "or a value in [0, 1].")] = "auto",
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
) -> None:
    """Combine finished runs by task arithmetic: zero-shot + coefficient * the sum of their task vectors."""
    from rich.console import Console

    from patcher.runs.report import accuracy_table, alpha_lines
    from patcher.runs.store import load_run
    from patcher.stages.merge import MergeOptions, merge_runs

    options = MergeOptions(runs=list(runs), out=out, support=[s.strip() for s in support.split(",") if s.strip()],
                           tolerance=tolerance, alpha=alpha, data_dir=data_dir, download=download, device=device)
    try:
        path = merge_runs(options)
    except PatcherError as error:
        _fail(error)
    manifest = load_run(path).manifest
    console = Console()
    console.print(accuracy_table(manifest))
    for line in alpha_lines(manifest):
        console.print(line)
    console.print(f"run: {path}")


@app.command()
def pretrain(
    model: Annotated[str, typer.Option(help="open_clip config to train from scratch.")] = "patcher-mini",
    steps: Annotated[int, typer.Option(help="Training steps.")] = 600,
    batch_size: Annotated[int, typer.Option(help="Image-caption pairs per batch.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batches and captions.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 100,
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the reference-model cache).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted pretraining.")] = False,
) -> None:
    """Train the offline reference mini CLIP (Fashion-MNIST and digits 0-4, contrastive); print its folder."""
    from patcher.stages.pretrain import PretrainOptions, reference_dir
    from patcher.stages.pretrain import pretrain as run_pretrain
    from patcher.training.loop import TrainConfig

    options = PretrainOptions(
        model=model,
        train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed,
                          checkpoint_every=checkpoint_every),
        device=device,
        data_dir=data_dir,
        download=download,
        out=out,
        resume=resume,
    )
    target = out or reference_dir(options)
    if out is None and (target / "pretrain.json").is_file():
        typer.echo(f"up to date: {target}")
        typer.echo(f"use it with: --model local-dir:{target}")
        return
    try:
        path = run_pretrain(options)
    except PatcherError as error:
        _fail(error)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command with --resume to continue", err=True)
        raise typer.Exit(130) from None
    import json

    record = json.loads((path / "pretrain.json").read_text())
    for task, result in record["zero_shot"].items():
        typer.echo(f"zero-shot {task}: {result['accuracy']:.2f}% (chance {result['chance']:.2f}%)")
    typer.echo(f"model: {path}")
    typer.echo(f"use it with: --model local-dir:{path}")


@app.command()
def show(run: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Print a run's summary table."""
    from rich.console import Console

    from patcher.runs.report import accuracy_table, alpha_lines
    from patcher.runs.store import load_run

    try:
        manifest = load_run(run).manifest
    except PatcherError as error:
        _fail(error)
    console = Console()
    console.print(accuracy_table(manifest))
    for line in alpha_lines(manifest):
        console.print(line)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory from `patcher build`.")],
    out: Annotated[Path | None, typer.Option(help="Export directory (default RUN/onnx).")] = None,
    fp16: Annotated[bool, typer.Option(help="Also write half-precision variants (float32 in and out).")] = False,
    optimize: Annotated[bool, typer.Option(help="Also apply onnxruntime's offline graph optimisation.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    tasks: Annotated[str, typer.Option(help="Comma-separated subset of the run's tasks (default all).")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace a different export already at --out.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Export the patched and zero-shot classifiers to ONNX, verified against PyTorch on held-out images."""
    import json

    from patcher.export import EXPORT_JSON, export_run

    try:
        path = export_run(run, out=out, fp16=fp16, optimize=optimize, opset=opset,
                          tasks=[t.strip() for t in tasks.split(",") if t.strip()] or None,
                          overwrite=overwrite, data_dir=data_dir)
    except PatcherError as error:
        _fail(error)
    record = json.loads((path / EXPORT_JSON).read_text())
    for key, model in record["models"].items():
        typer.echo(f"{key}: {path / model['file']} ({model['bytes'] / 1e6:.1f} MB)")
    for key, report in record["parity"]["models"].items():
        typer.echo(f"parity {key}: {json.dumps(_parity_summary(report))}")
    typer.echo(f"export: {path}")


def _parity_summary(report: dict) -> dict:
    keys = ("max_abs_diff", "top1_agreement", "batch_sizes", "images", "passed")
    return {k: report[k] for k in keys if k in report}


@app.command()
def triton(
    run: Annotated[Path, typer.Argument(help="A run directory (its onnx/ export) or an export directory.")],
    repo: Annotated[Path, typer.Option(help="Model repository to write into.")] = Path("triton_models"),
    name: Annotated[str | None, typer.Option(help="Model name (default: the patch task).")] = None,
    backend: Annotated[str, typer.Option(help="python (bundled server) or onnxruntime (NVIDIA container).")] = "python",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch the server accepts.")] = 64,
    instances: Annotated[int, typer.Option(help="Model instances per model.")] = 1,
    max_queue_delay_us: Annotated[int, typer.Option(help="Batching delay, us (0: batch what is queued).")] = 0,
    tensorrt_fp16: Annotated[bool, typer.Option(help="TensorRT FP16 accelerator (onnxruntime backend, GPU).")] = False,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 for an export made with --fp16.")] = "fp32",
) -> None:
    """Write (or add a new version to) a Triton model repository from an export."""
    from patcher.triton import write_repository

    export_dir = run / "onnx" if (run / "onnx").is_dir() else run
    try:
        result = write_repository(export_dir, repo, name=name, backend=backend, max_batch_size=max_batch_size,
                                  instances=instances, max_queue_delay_us=max_queue_delay_us,
                                  tensorrt_fp16=tensorrt_fp16, precision=precision)
    except PatcherError as error:
        _fail(error)
    typer.echo(result["message"])
    for model, entry in result["models"].items():
        typer.echo(f"  {model} ({entry['kind']}): versions {entry['versions']}")


@app.command()
def serve(
    repo: Annotated[Path, typer.Option(help="Model repository.")] = Path("triton_models"),
    models: Annotated[str, typer.Option(help="Comma-separated models to load (default all).")] = "",
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (0: a free one).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: a free one).")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Metrics port (0: a free one).")] = 8002,
    log: Annotated[Path | None, typer.Option(help="Server log file.")] = None,
) -> None:
    """Run the bundled Triton Inference Server on a model repository until Ctrl-C or SIGTERM."""
    from patcher.triton.server import distinct_free_ports, serve_forever

    spare = iter(distinct_free_ports(3, host))
    http_port, grpc_port, metrics_port = (value or next(spare) for value in (http_port, grpc_port, metrics_port))
    try:
        serve_forever(repo, [m.strip() for m in models.split(",") if m.strip()] or None, host, http_port,
                      grpc_port, metrics_port, log)
    except PatcherError as error:
        _fail(error)


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG, PNG, PPM).")],
    model: Annotated[str, typer.Option(help="Served model name (the ensemble, e.g. the patch task).")],
    url: Annotated[str, typer.Option(help="Triton gRPC address.")] = "127.0.0.1:8001",
    top_k: Annotated[int, typer.Option(help="Labels per task.")] = 3,
    raw: Annotated[bool, typer.Option(help="Preprocess here and send tensors to <model>_patched.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Classify image files with a served model over gRPC; top-k labels and scores per task."""
    import json

    from patcher.triton import classify_files

    try:
        results = classify_files(images, model, url=url, top_k=top_k, raw=raw, batch_size=batch_size)
    except PatcherError as error:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for result in results:
        typer.echo(f"{result['file']}:")
        for task, labels in result["tasks"].items():
            shown = ", ".join(f"{entry['label']} ({entry['score']:.2f})" for entry in labels)
            typer.echo(f"  {task}: {shown}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PatcherError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None


@app.command()
def bench(
    run: Annotated[Path | None, typer.Argument(help="A run directory (starts the bundled server itself).")] = None,
    url: Annotated[str | None, typer.Option(help="Benchmark an already running server instead.")] = None,
    models: Annotated[str, typer.Option(help="With --url: comma-separated model names.")] = "",
    concurrency: Annotated[str, typer.Option(help="Concurrent requests to sweep.")] = "1,2,4,8",
    batch_sizes: Annotated[str, typer.Option(help="Client batch sizes to sweep.")] = "1,8,32",
    duration: Annotated[float, typer.Option(help="Seconds per setting (bounded also by --max-requests).")] = 5.0,
    max_requests: Annotated[int, typer.Option(help="Requests per setting at most.")] = 2000,
    shared_memory: Annotated[bool, typer.Option(help="Send inputs through system shared memory.")] = False,
    out: Annotated[Path, typer.Option(help="Where the JSON, Markdown and PNG go.")] = Path("bench/results"),
    name: Annotated[str | None, typer.Option(help="Report name (default: the run's name).")] = None,
) -> None:
    """Throughput and latency of patched against zero-shot (and the alternatives), served by Triton."""
    from rich.console import Console

    from patcher.bench import bench_run, bench_url, format_table

    try:
        sweep = {"concurrency": _int_list(concurrency), "batch_sizes": _int_list(batch_sizes),
                 "duration_s": duration, "max_requests": max_requests, "shared_memory": shared_memory,
                 "out_dir": out}
        if (run is None) == (url is None):
            raise PatcherError("pass either a run directory or --url HOST:PORT with --models")
        if run is not None:
            report = bench_run(run, name=name, **sweep)
        else:
            model_list = [m.strip() for m in models.split(",") if m.strip()]
            if not model_list:
                raise PatcherError("--url needs --models A,B (the served model names to compare)")
            report = bench_url(url, model_list, name=name, **sweep)
    except PatcherError as error:
        _fail(error)
    Console().print(format_table(report))


@app.command()
def demo(
    serve: Annotated[bool, typer.Option(help="Serve with Triton and classify over gRPC.")] = True,
    bench: Annotated[bool, typer.Option(help="Benchmark patched against zero-shot.")] = True,
) -> None:
    """The offline demo: pretrain (or reuse) the mini CLIP, patch digits protecting Fashion-MNIST, export, serve."""
    from patcher.stages.demo import DemoOptions, run_demo

    try:
        summary = run_demo(DemoOptions(serve=serve, bench=bench))
    except PatcherError as error:
        _fail(error)
    typer.echo(f"demo finished in {summary['total_s']:.0f} s; results in bench/results/demo.md")


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from patcher.data.tasks import known_tasks

    for name in known_tasks():
        typer.echo(name)


@app.command()
def models(pretrained: Annotated[bool, typer.Option(help="Also list pretrained tags.")] = False) -> None:
    """List open_clip model names (and their pretrained tags)."""
    from patcher.compat import import_open_clip

    open_clip = import_open_clip()
    import patcher.models  # noqa: F401  (registers patcher-tiny and patcher-mini)

    if pretrained:
        for name, tag in open_clip.list_pretrained():
            typer.echo(f"{name}\t{tag}")
    else:
        for name in open_clip.list_models():
            typer.echo(name)


def main() -> None:
    """Entry point that also turns stray PatcherErrors into one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except PatcherError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
