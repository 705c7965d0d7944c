"""One training loop for every method (AdamW, warmup + cosine, clipping, resumable checkpoints), and the runner
that takes a method through it stage by stage.

Each method supplies only its loss for a step; the loop owns the optimiser, the schedule, mixed
precision on CUDA, gradient accumulation, progress, logging, evaluation and checkpoints. A checkpoint holds the
step, the trained module's state, and the optimiser, schedule and scaler states, and batches are a pure function
of the step, so `--resume` reaches the same result as an uninterrupted run.

With `accum_steps` K the loop calls `step_loss(step, Micro(j, K))` for j < K and backpropagates each, ranks
synchronising in the last pass only; a method makes the K passes' gradients add up to the whole batch's (a
per-item loss is a sum over its micro-batch; FLYP's contrastive loss recomputes among cached features). With
K = 1 it calls `step_loss(step)`.
"""

from __future__ import annotations

import inspect
import io
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from patcher.base import distributed
from patcher.base.errors import PatcherError
from patcher.base.files import append_json_line, atomic_file, trim_json_lines
from patcher.base.progress import console, make_progress
from patcher.training.config import TrainConfig
from patcher.training.sampling import Micro

if TYPE_CHECKING:
    from patcher.training.methods.base import Method, Stage

CHECKPOINT = "checkpoint.pt"
TIMING_KEYS = ("images_per_s",)  # log entries a person watches but train.log leaves out (it stays reproducible)
StepLoss = Callable[..., torch.Tensor]  # step -> loss, and (step, Micro) -> loss when accumulating
Evaluate = Callable[[], dict[str, float]]  # held-out accuracy (%) per task of the weights being trained


def pick_device(requested: str = "auto") -> str:
    """'cuda' when requested or available under 'auto', else 'cpu'."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def precision_name(device: str) -> str:
    """The precision training runs in on this device (mixed precision on CUDA)."""
    if not device.startswith("cuda"):
        return "fp32"
    return "amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16"


def autocast(device: str) -> AbstractContextManager[Any]:
    """Mixed precision on CUDA (bf16 where supported, else fp16); nothing on CPU."""
    precision = precision_name(device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "amp-bf16" else torch.float16)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def checkpoint_step(checkpoint_dir: Path | None) -> int:
    """The step a checkpoint in this folder resumes from (0 when there is none)."""
    if checkpoint_dir is None or not (checkpoint_dir / CHECKPOINT).is_file():
        return 0
    return int(torch.load(checkpoint_dir / CHECKPOINT, map_location="cpu", weights_only=True)["step"])


class _StepModule(nn.Module):
    """The trained module with the step's loss as its forward, so DistributedDataParallel can wrap it."""

    def __init__(self, module: nn.Module, step_loss: StepLoss) -> None:
        super().__init__()
        self.module = module
        self.step_loss = step_loss

    def forward(self, step: int, micro: Micro) -> torch.Tensor:
        return self.step_loss(step) if micro.count == 1 else self.step_loss(step, micro)


class _Speed:
    """Training images per second since the last reading; time spent evaluating or checkpointing left out."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.started, self.paused, self.images = time.perf_counter(), 0.0, 0

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Time inside this block does not count."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - started

    def read(self) -> float:
        """Images per second over the window (queued GPU work finished first); a new window starts."""
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.started - self.paused
        speed = self.images / elapsed if elapsed > 0 else 0.0
        self.reset()
        return speed


def _synchronising(stepper: nn.Module, micro: Micro) -> AbstractContextManager[Any]:
    """Under DDP, gradients of every micro-batch but the last accumulate locally; the last pass averages them."""
    return nullcontext() if micro.last or not hasattr(stepper, "no_sync") else stepper.no_sync()


def _data_parallel(module: nn.Module, step_loss: StepLoss, device: str) -> nn.Module:
    """The step module, wrapped in DistributedDataParallel under torchrun (gradients averaged over ranks)."""
    stepper = _StepModule(module, step_loss)
    if distributed.world_size() == 1:
        return stepper
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    # heads are buffers that never change: no need to send them every step
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(stepper, device_ids=device_ids, **no_sync)


@dataclass(frozen=True, kw_only=True)
class Tracking:
    """Where one training keeps its resumable checkpoint (`checkpoint_dir`) and what it reports: log entries to
    `log`, progress under `description`, held-out accuracy from `evaluate` every `eval_every` steps and at the end."""

    checkpoint_dir: Path | None = None
    log: Callable[[dict[str, Any]], None] | None = None
    description: str = "training"
    evaluate: Evaluate | None = None


class _Optimisation:
    """AdamW with warmup + cosine, the AMP gradient scaler, and gradient clipping: one step over micro-batches, and
    the checkpoint that resumes it."""

    def __init__(self, parameters: list[nn.Parameter], train_config: TrainConfig, device: str) -> None:
        self.parameters, self.config, self.device = parameters, train_config, device
        self.optimizer = torch.optim.AdamW(parameters, lr=train_config.lr, weight_decay=train_config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, train_config.warmup_steps, train_config.steps)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision_name(device) == "amp-fp16")
        self.micros = [Micro(index, train_config.accum_steps) for index in range(train_config.accum_steps)]

    def restore(self, checkpoint: Path | None, module: nn.Module) -> int:
        """The step to start from: the checkpoint's (module and optimiser states loaded), else 0."""
        if checkpoint is None or not checkpoint.is_file():
            return 0
        saved = torch.load(checkpoint, map_location=self.device, weights_only=True)
        module.load_state_dict(saved["module"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        return int(saved["step"])

    def step(self, stepper: nn.Module, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One update from the step's micro-batches: (this rank's summed loss, gradient norm before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for micro in self.micros:
            with _synchronising(stepper, micro):
                with autocast(self.device):
                    part = stepper(step, micro)
                self.scaler.scale(part).backward()
            loss += part.detach().float()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, grad_norm

    def save(self, path: Path, step: int, module: nn.Module) -> None:
        """The checkpoint after `step` steps, written whole or not at all."""
        _save_checkpoint(path, step, module, self.optimizer, self.scheduler, self.scaler)

    def log_entry(self, done: int, loss: float, grad_norm: torch.Tensor, images_per_s: float,
                  accuracy: dict[str, float] | None) -> dict[str, Any]:
        """The log line after `done` steps (`loss`: averaged over ranks)."""
        entry = {"step": done, "loss": round(loss, 5), "lr": self.scheduler.get_last_lr()[0],
                 "grad_norm": round(float(grad_norm), 5), "images_per_s": round(images_per_s, 2)}
        if accuracy is not None:
            entry["val_accuracy"] = {task: round(score, 4) for task, score in accuracy.items()}
        return entry


def _check_batch(train_config: TrainConfig) -> None:
    if train_config.batch_size < train_config.accum_steps * distributed.world_size():
        raise PatcherError(f"--batch-size {train_config.batch_size} leaves a micro-batch without images on "
                           f"{distributed.world_size()} process(es) with --accum-steps {train_config.accum_steps}: "
                           "raise --batch-size or lower --accum-steps")


def train(module: nn.Module, parameters: Iterable[nn.Parameter], step_loss: StepLoss, train_config: TrainConfig,
          device: str = "cpu", tracking: Tracking | None = None) -> None:
    """Minimise `step_loss(step)` over `parameters` (of `module`, whose state is checkpointed) for the configured
    steps, each step's batch in `accum_steps` micro-batches; `tracking.evaluate` every `eval_every` steps and at the
    end.

    Under torchrun every rank runs this with its part of each batch; DistributedDataParallel averages the
    gradients, so the update is the one-process update of the whole batch. Rank 0 writes checkpoints. `tracking.log`
    gets the step, loss, learning rate, gradient norm (before clipping), images per second and any held-out
    accuracy, every `log_every` steps and at every evaluation.
    """
    tracking = tracking or Tracking()
    _check_batch(train_config)
    optimisation = _Optimisation([p for p in parameters if p.requires_grad], train_config, device)
    checkpoint = tracking.checkpoint_dir / CHECKPOINT if tracking.checkpoint_dir is not None else None
    first_step = optimisation.restore(checkpoint, module)

    module.train()
    stepper = _data_parallel(module, step_loss, device)
    every = train_config.eval_every if tracking.evaluate is not None else 0
    speed = _Speed(device)
    with make_progress() as progress:
        bar = progress.add_task(tracking.description, total=train_config.steps, completed=first_step, status="")
        for step in range(first_step, train_config.steps):
            loss, grad_norm = optimisation.step(stepper, step)
            speed.images += train_config.batch_size
            done = step + 1
            accuracy = None
            if every and (done % every == 0 or done == train_config.steps):
                with speed.pause():
                    accuracy = tracking.evaluate()  # type: ignore[misc]
                    module.train()  # evaluation put the encoder in eval mode
            if step % train_config.log_every == 0 or done == train_config.steps or accuracy is not None:
                value = float(distributed.all_reduce_sum(loss).item()) / distributed.world_size()
                images_per_s = speed.read()
                progress.update(bar, status=f"loss {value:.3f}, {images_per_s:.1f} img/s")
                entry = optimisation.log_entry(done, value, grad_norm, images_per_s, accuracy)
                if tracking.log is not None and distributed.is_main():
                    tracking.log(entry)
            progress.update(bar, advance=1)
            if (checkpoint is not None and done % train_config.checkpoint_every == 0 and done < train_config.steps
                    and distributed.is_main()):
                with speed.pause():
                    optimisation.save(checkpoint, done, module)
    module.eval()


def _save_checkpoint(path: Path, step: int, module: nn.Module, optimizer: Any, scheduler: Any, scaler: Any) -> None:
    state = {"step": step, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialised in memory, so a full disk is a plain OSError from the write below
    with atomic_file(path) as temporary:
        temporary.write_bytes(buffer.getbuffer())


DONE = "done.pt"


def _freeze_all_but(stage: Stage) -> None:
    trained = {id(p) for p in stage.parameters}
    for parameter in stage.module.parameters():
        parameter.requires_grad_(id(parameter) in trained)


@dataclass(frozen=True, kw_only=True)
class MethodTracking:
    """Where a method's stages keep their checkpoints (a folder each under `checkpoint_dir`) and log: train.log at
    `log_path`, every line also to `on_log`; steps numbered from `step_offset`, stage names prefixed with `label`."""

    checkpoint_dir: Path | None = None
    log_path: Path | None = None
    step_offset: int = 0
    label: str = ""
    on_log: Callable[[dict[str, Any]], None] | None = None


def train_method(method: Method, device: str = "cpu", tracking: MethodTracking | None = None,
                 evaluate: Evaluate | None = None) -> int:
    """Train every stage in order; a finished stage is restored from its `done.pt`. Returns the steps run in all.

    Log lines number steps across stages (and across earlier calls, from `tracking.step_offset`) and name the
    stage; train.log gets each line without its timings, `tracking.on_log` the whole line. With
    `grad_checkpointing` the towers the method trains recompute their activations in the backward pass, for this
    training only.
    """
    checkpointing = method.setup.train_config.grad_checkpointing
    try:
        if checkpointing and not method.set_grad_checkpointing(True) and distributed.is_main():
            console.print(f"[yellow]warning:[/] open_clip has no gradient checkpointing for "
                          f"{method.setup.loaded.name}'s towers: training without it")
        return _train_stages(method, device, tracking or MethodTracking(), evaluate)
    finally:
        method.close()
        if checkpointing:
            method.set_grad_checkpointing(False)
        for parameter in method.setup.loaded.model.parameters():
            parameter.requires_grad_(True)


def _train_stages(method: Method, device: str, tracking: MethodTracking, evaluate: Evaluate | None) -> int:
    main = distributed.is_main()
    checkpoint_dir, log_path, on_log = tracking.checkpoint_dir, tracking.log_path, tracking.on_log
    step_offset, label = tracking.step_offset, tracking.label
    offset = step_offset
    for index, stage in enumerate(method.stages()):
        if stage.train_config.steps < 1:
            raise PatcherError(f"stage {stage.name} of {method.name} has {stage.train_config.steps} steps: "
                               "give at least 1")
        folder = checkpoint_dir / f"{label}{index}-{stage.name}" if checkpoint_dir is not None else None
        if folder is not None and (folder / DONE).is_file():
            stage.module.load_state_dict(torch.load(folder / DONE, map_location=device, weights_only=True))
            offset += stage.train_config.steps
            continue
        if folder is not None and main:
            folder.mkdir(parents=True, exist_ok=True)
        if log_path is not None and main:
            trim_json_lines(log_path, offset + checkpoint_step(folder))
        _freeze_all_but(stage)
        name = f"{label}{stage.name}"

        def log(entry: dict[str, Any], offset: int = offset, name: str = name) -> None:
            line = {**entry, "step": entry["step"] + offset, "stage": name,
                    **{k: round(v, 6) for k, v in method.step_terms().items()}}
            if log_path is not None and main:
                append_json_line(log_path, {k: v for k, v in line.items() if k not in TIMING_KEYS})
            if on_log is not None:
                on_log(line)

        description = f"{' '.join(dict.fromkeys([method.name, name]))} on {', '.join(method.setup.train_splits)}"
        train(stage.module, stage.parameters, stage.step_loss, stage.train_config, device,
              Tracking(checkpoint_dir=folder, log=log, description=description, evaluate=evaluate))
        if folder is not None and main:
            with atomic_file(folder / DONE) as temporary:
                torch.save(stage.module.state_dict(), temporary)
        offset += stage.train_config.steps
    return offset - step_offset
