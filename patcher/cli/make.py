"""Commands that make runs: build, merge, pretrain, show, demo, and the task and model listings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from patcher.base.errors import PatcherError
from patcher.cli.shared import DataDir, Device, Download, comma_list

if TYPE_CHECKING:
    from patcher.patching.merge_search import MergeSpec

Workers = Annotated[int | None, typer.Option(help="DataLoader worker processes per rank (default: cores - 1, <= 8).")]
DataMode = Annotated[str, typer.Option(
    help="auto: a split up to 64 MB of decoded pixels is held in RAM, a larger one streams (held-out and test "
         "splits through a disk cache, training through DataLoader workers); memory or stream force either.")]
SkipBadImages = Annotated[bool, typer.Option(
    help="Leave unusable image files of folder: datasets out (counted in a warning) instead of refusing them.")]
MergeMethodOption = Annotated[str, typer.Option(
    "--method", help="How task vectors combine: task-arithmetic, ties, dare, breadcrumbs, consensus, wudi "
                     "(data-free), layerwise (AdaMerging, entropy on unlabelled held-out images) or "
                     "layerwise-labelled; see `patcher merge-methods`.")]
MergeParam = Annotated[list[str] | None, typer.Option(
    "--param", help="Hold a merge parameter at a value instead of searching its grid, KEY=VALUE, repeatable "
                    "(ties density, dare drop, breadcrumbs density/gamma, consensus tall_lambda/agreement, wudi "
                    "steps/lr).")]
MinRetained = Annotated[float | None, typer.Option(
    help="Also require each merged task to keep this share of its own fine-tune's held-out accuracy, e.g. 0.9.")]
MergeSeed = Annotated[int, typer.Option(help="Seed of DARE's drop masks and of the layer-wise learning.")]


def print_run(path: Path) -> None:
    """A run's accuracy table and how its alpha was chosen."""
    from rich.console import Console

    from patcher.runs.manifest import load_run
    from patcher.runs.summary import accuracy_table, alpha_lines, metrics_table

    manifest = load_run(path).manifest
    console = Console()
    console.print(accuracy_table(manifest))
    metrics = metrics_table(manifest)
    if metrics is not None:
        console.print(metrics)
    for line in alpha_lines(manifest):
        console.print(line)


def build(
    task: Annotated[str, typer.Option(
        help="Task(s) to patch, comma-separated (see `patcher tasks`), or your own data: folder:DIR, csv:DIR, "
             "csv:FILE.csv or wds:DIR (docs/your-data.md).")],
    task_name: Annotated[str | None, typer.Option(
        help="Name of your own dataset's task in models and tensors (default: its folder's name).")] = None,
    csv_img_key: Annotated[str, typer.Option(help="csv: the image path column (as open_clip_train).")] = "filepath",
    csv_caption_key: Annotated[str, typer.Option(help="csv: the class label column.")] = "label",
    csv_separator: Annotated[str, typer.Option(help="csv: the column separator.")] = ",",
    support: Annotated[str, typer.Option(
        help="Comma-separated supported tasks to protect, each optionally with its own tolerance in points "
             "(imagenet:0.5,cars:2; a bare name takes --tolerance).")] = "",
    monitor: Annotated[str, typer.Option(
        help="Comma-separated tasks measured at every alpha and on test (manifest, show, plots), never part of "
             "the rule.")] = "",
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
    merge_method: Annotated[str, typer.Option(
        help="--multi parallel: how the task vectors combine (see `patcher merge-methods`).")] = "task-arithmetic",
    merge_param: Annotated[list[str] | None, typer.Option(
        help="--multi parallel: a merge parameter held at KEY=VALUE instead of searched, repeatable.")] = None,
    min_retained: MinRetained = None,
    alpha: Annotated[str, typer.Option(help="'auto' (chosen on held-out data) or a value in [0, 1].")] = "auto",
    tolerance: Annotated[float, typer.Option(
        help="Points of accuracy a supported task may lose (unless --support gives it its own).")] = 1.0,
    search: Annotated[str, typer.Option(help="Alpha search: golden (fewer evaluations) or grid (all 11).")] = "golden",
    steps: Annotated[int | None, typer.Option(help="Training steps (default 2000).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Train for this many epochs instead of --steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global training batch size (default 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate, AdamW (default 1e-5; lp 1e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", "--wd", help="AdamW weight decay (default 0.1; lp 0).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(
        "--warmup-steps", "--warmup", help="Warmup steps (default 500; lp 0).")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Gradient norm clip (default 1.0).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for initialisation, batch order and augmentation.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default 500).")] = None,
    accum_steps: Annotated[int | None, typer.Option(
        "--accum-steps", "--accum-freq",
        help="Gradient accumulation: each step's --batch-size in K micro-batches (same update, less memory; "
             "FLYP's contrastive loss recomputed among cached features).")] = None,
    grad_checkpointing: Annotated[bool, typer.Option(
        help="Recompute the trained towers' activations in the backward pass (open_clip's gradient "
             "checkpointing): less memory, about a third more compute.")] = False,
    shots: Annotated[int | None, typer.Option(
        help="Few-shot: train on K images per class of each patch task (seeded by --seed).")] = None,
    eval_every: Annotated[int | None, typer.Option(
        help="Held-out accuracy of the weights being trained every N steps (train.log and the manifest).")] = None,
    report_to: Annotated[str, typer.Option(
        help="Curves to watch, under RUN/reports: tensorboard, wandb, or both comma-separated (wandb honours "
             "WANDB_MODE=offline).")] = "",
    augment: Annotated[bool, typer.Option(help="Train on open_clip's train transform (random resized crops).")] = True,
    eval_batch_size: Annotated[int, typer.Option(help="Images per batch when evaluating (held-out and test).")] = 256,
    precision: Annotated[str, typer.Option(
        help="auto: mixed precision on CUDA (bf16 where supported), fp32 on CPU; open_clip_train's names (amp, "
             "amp_bf16, fp32) are checked against it.")] = "auto",
    workers: Workers = None,
    data_mode: DataMode = "auto",
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<task>-<method>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted build at --out.")] = False,
    skip_bad_images: SkipBadImages = False,
) -> None:
    """Fine-tune on one or more tasks with a method, interpolate with the zero-shot weights and choose alpha."""
    from patcher.data.options import DataOptions
    from patcher.data.tasks.user_data import named_spec
    from patcher.stages.build import BuildOptions
    from patcher.stages.build import build as run_build
    from patcher.training.methods import train_config

    _check_precision(precision, device)
    csv_keys = {"img_key": csv_img_key, "label_key": csv_caption_key, "sep": csv_separator}
    task = named_spec(task, task_name, csv_keys)
    params = dict(_key_value(item) for item in param or [])
    hyperparameters = train_config(method, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                   warmup_steps=warmup_steps, grad_clip=grad_clip, seed=seed,
                                   checkpoint_every=checkpoint_every, accum_steps=accum_steps,
                                   grad_checkpointing=grad_checkpointing or None, shots=shots, eval_every=eval_every,
                                   report_to=tuple(comma_list(report_to)) or None)
    options = BuildOptions(
        task=task, support=comma_list(support), model=model,
        pretrained=None if pretrained.lower() == "none" else pretrained, image_size=image_size, method=method,
        method_params=params, multi=multi, alpha=alpha, tolerance=tolerance, search=search,
        train_config=hyperparameters,
        epochs=epochs, data_dir=data_dir, download=download, device=device, out=out, resume=resume,
        data=DataOptions(workers=workers, augment=augment, mode=data_mode, skip_bad_images=skip_bad_images),
        eval_batch_size=eval_batch_size, monitor=comma_list(monitor),
        merge=merge_spec(merge_method, merge_param, min_retained, seed or 0),
    )
    try:
        path = run_build(options)
    except KeyboardInterrupt:
        hint = f" --out {out} --resume" if out else " with --out DIR (and --resume next time)"
        typer.echo(f"interrupted: rerun the same command{hint} to continue from the last checkpoint", err=True)
        raise typer.Exit(130) from None
    if path is None:  # a rank other than 0 of a distributed build: rank 0 reports
        return
    print_run(path)
    typer.echo(f"run: {path}")


PRECISIONS = {"auto": None, "fp32": "fp32", "amp": "amp", "amp_bf16": "amp-bf16", "amp_fp16": "amp-fp16"}


def _check_precision(precision: str, device: str) -> None:
    """--precision as open_clip_train spells it, refused where patcher would train in another one on this device."""
    from patcher.training.loop import pick_device, precision_name

    if precision not in PRECISIONS:
        raise PatcherError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    wanted, used = PRECISIONS[precision], precision_name(pick_device(device))
    if wanted is not None and not used.startswith(wanted):
        raise PatcherError(f"--precision {precision}: patcher trains in {used} on this device ({pick_device(device)}); "
                           "pass --precision auto")


def _key_value(item: str) -> tuple[str, str]:
    key, separator, value = item.partition("=")
    if not separator or not key.strip():
        raise PatcherError(f"--param {item!r} is not KEY=VALUE: e.g. --param kl_weight=0.5")
    return key.strip(), value.strip()


def merge(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to combine (one base model and architecture).")],
    out: Annotated[Path, typer.Option(help="Directory for the merged run.")],
    support: Annotated[str, typer.Option(help="More comma-separated supported tasks to protect.")] = "",
    tolerance: Annotated[float, typer.Option(help="Points of accuracy a supported task may lose.")] = 1.0,
    alpha: Annotated[str, typer.Option(help="Coefficient of the merged task vector: 'auto' (grid 0..1 on held-out "
                                            "data) or a value in [0, 1].")] = "auto",
    method: MergeMethodOption = "task-arithmetic",
    param: MergeParam = None,
    min_retained: MinRetained = None,
    seed: MergeSeed = 0,
    search: Annotated[str, typer.Option(help="Coefficient search for each parameter setting: grid (all 11) or "
                                             "golden (fewer evaluations).")] = "grid",
    workers: Workers = None,
    data_mode: DataMode = "auto",
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
    skip_bad_images: SkipBadImages = False,
) -> None:
    """Combine finished runs into one model: zero-shot + coefficient * their merged task vectors."""
    from patcher.data.options import DataOptions
    from patcher.stages.merge import MergeOptions, merge_runs

    spec = merge_spec(method, param, min_retained, seed, search)
    path = merge_runs(MergeOptions(runs=list(runs), out=out, support=comma_list(support), tolerance=tolerance,
                                   alpha=alpha, data_dir=data_dir, download=download, device=device,
                                   data=DataOptions(workers=workers, mode=data_mode,
                                                    skip_bad_images=skip_bad_images), merge=spec))
    print_run(path)
    print_merge(path)
    typer.echo(f"run: {path}")


def print_merge(path: Path) -> None:
    """The merge method, its chosen parameters, and the share of each task's own fine-tune kept on test."""
    from patcher.runs.manifest import load_run

    multi = load_run(path).manifest.multi
    if multi is None or multi.merge is None:
        return
    merge = multi.merge
    params = ", ".join(f"{key} {value:g}" for key, value in merge.params.items()) or "no parameters"
    shares = ", ".join(f"{task} {share:.0%}" for task, share in merge.test_retained.items())
    typer.echo(f"merge: {merge.method} ({params}); retained of each own fine-tune on test: {shares}; "
               f"worst {merge.worst_task}")


def merge_spec(method: str, param: list[str] | None, min_retained: float | None, seed: int,
               search: str = "grid") -> MergeSpec:
    """The merge method and its fixed parameters, checked (one error line for a bad name or value)."""
    from patcher.patching.merge_methods import get_method, parse_params
    from patcher.patching.merge_search import MergeSpec

    spec = MergeSpec(method, parse_params(get_method(method), param or []), min_retained, seed, search)
    spec.check()
    return spec


def merge_methods() -> None:
    """The registered merge methods: parameters and grids, reference, and the data each needs."""
    from patcher.patching.merge_methods import METHODS

    for entry in METHODS.values():
        typer.echo(f"{entry.name}: {entry.title}")
        for parameter in entry.parameters:
            grid = ", ".join(f"{v:g}" for v in parameter.grid)
            typer.echo(f"    {parameter.name} (grid {grid}): {parameter.help}")
        typer.echo(f"    paper: {entry.paper}\n    code: {entry.code}\n    needs: {entry.needs}")


REFERENCE_DEFAULT = "default: the reference model's"


def pretrain(
    model: Annotated[str, typer.Option(help="open_clip config to train from scratch.")] = "patcher-base",
    steps: Annotated[int | None, typer.Option(help=f"Training steps ({REFERENCE_DEFAULT}).")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"Images per batch ({REFERENCE_DEFAULT}).")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Peak learning rate, AdamW ({REFERENCE_DEFAULT}).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=f"Linear warmup steps ({REFERENCE_DEFAULT}).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batches and captions.")] = 0,
    objective: Annotated[str, typer.Option(
        help="classes: every caption of a class is a positive of its images (UniCL); instances: CLIP's pairs."
    )] = "classes",
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 100,
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the reference-model cache).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted pretraining.")] = False,
    ship: Annotated[bool, typer.Option(
        help="Make the result the shipped reference model (patcher/models/reference/, committed in git).")] = False,
) -> None:
    """Train the offline reference CLIP (contrastive, on captioned images); print its folder."""
    import json
    from dataclasses import replace

    from patcher.stages.pretrain import PretrainOptions, reference_dir
    from patcher.stages.pretrain import pretrain as run_pretrain

    reference = PretrainOptions()
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps}
    train = replace(reference.train, seed=seed, checkpoint_every=checkpoint_every,
                    **{key: value for key, value in given.items() if value is not None})
    options = replace(reference, model=model, objective=objective, train=train, device=device, data_dir=data_dir,
                      download=download, out=out, resume=resume)
    target = out or reference_dir(options)
    if out is None and (target / "pretrain.json").is_file():
        typer.echo(f"up to date: {target}")
        typer.echo(f"use it with: --model local-dir:{target}")
        return
    try:
        path = run_pretrain(options)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command with --resume to continue", err=True)
        raise typer.Exit(130) from None
    record = json.loads((path / "pretrain.json").read_text())
    for task, result in record["zero_shot"].items():
        typer.echo(f"zero-shot {task}: {result['accuracy']:.2f}% (chance {result['chance']:.2f}%)")
    typer.echo(f"model: {path}")
    typer.echo(f"use it with: --model local-dir:{path}")
    if ship:
        from patcher.models.reference import ship as ship_reference

        typer.echo(f"shipped as patcher-reference: {ship_reference(path)} (commit it)")


def show(run: Annotated[Path, typer.Argument(help="A run directory, or patcher-reference.")]) -> None:
    """Print a run's summary table, or the shipped reference model's provenance."""
    from patcher.models.reference import REFERENCE_NAME

    if str(run) == REFERENCE_NAME and not run.exists():
        from patcher.models.reference import REFERENCE_DIR, model_card, provenance

        typer.echo(model_card(provenance()).rstrip())
        typer.echo(f"\nfiles: {REFERENCE_DIR}")
        return
    print_run(run)


def demo(
    serve: Annotated[bool, typer.Option(help="Serve with Triton and classify over gRPC.")] = True,
    bench: Annotated[bool, typer.Option(help="Benchmark patched against zero-shot.")] = True,
    results_dir: Annotated[Path | None, typer.Option(
        help="Where demo.md and the figures go (default: the run's results/; bench/results refreshes the "
             "committed ones).")] = None,
) -> None:
    """The offline demo: patch digits on the shipped reference model protecting Fashion-MNIST, export, serve."""
    from patcher.stages.demo import DemoOptions, run_demo

    summary = run_demo(DemoOptions(serve=serve, bench=bench, results_dir=results_dir))
    typer.echo(f"demo finished in {summary['timings_s']['total']:.0f} s; results in {summary['results']}")


def tasks(
    suite: Annotated[str | None, typer.Option(help="Only this suite's tasks (mini-8, ...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list instead of the table.")] = False,
    data_dir: DataDir = None,
) -> None:
    """List the registered tasks: classes, whether their data is here, their suites (--json: also what each is and
    its paper)."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from patcher.data.tasks.listing import list_tasks
    from patcher.data.tasks.suites import suite_tasks

    if suite is not None:
        suite_tasks(suite)  # an unknown suite is one error line
    rows = list_tasks(suite, data_dir)
    if as_json:
        typer.echo(json.dumps([asdict(row) for row in rows], indent=2))
        return
    table = Table(title="registered tasks; your own data: folder:DIR, csv:DIR, csv:FILE.csv or wds:DIR "
                          "(docs/your-data.md)")
    for column in ("task", "classes", "data here", "suites"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shown = ", ".join(row.classnames[:4]) + (", ..." if row.classes > 4 else "")
        table.add_row(row.name, f"{row.classes}: {shown}", "yes" if row.data_here else "no", ", ".join(row.suites))
    Console().print(table)


def models(pretrained: Annotated[bool, typer.Option(help="Also list pretrained tags.")] = False) -> None:
    """List open_clip model names (and their pretrained tags)."""
    from patcher.models.clip_loader import open_clip

    if pretrained:
        for name, tag in open_clip.list_pretrained():
            typer.echo(f"{name}\t{tag}")
    else:
        for name in open_clip.list_models():
            typer.echo(name)
