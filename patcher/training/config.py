"""The hyperparameters of one training stage (`TrainConfig`): one record, filled once, read by the loop, the
methods and the manifest. Imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from patcher.base.errors import PatcherError

REPORTERS = ("tensorboard", "wandb")
# how training runs, watched or recorded, without changing what it computes (left out of `hyperparameters`)
NOT_DECIDING = ("checkpoint_every", "log_every", "eval_every", "report_to", "grad_checkpointing")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are PAINT's (AdamW, lr 1e-5, wd 0.1, 500 warmup steps, batch 128, clip 1.0)."""

    steps: int = 2000
    batch_size: int = 128  # the global batch of one optimiser step, over every process and micro-batch
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    accum_steps: int = 1  # each step's batch in this many micro-batches, gradients accumulated (same update)
    grad_checkpointing: bool = False  # recompute the trained towers' activations in the backward pass
    shots: int | None = None  # train on this many images per class of each patch task (seeded); None: all
    eval_every: int = 0  # held-out accuracy of the weights being trained every N steps (0: never)
    report_to: tuple[str, ...] = ()  # "tensorboard", "wandb": curves under the run directory

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return {name: value for name, value in asdict(self).items() if name in TrainConfig.__dataclass_fields__}

    def hyperparameters(self) -> dict[str, Any]:
        """The values that change what training computes (not how often it checkpoints, logs or evaluates, where
        it reports, or whether it recomputes activations)."""
        return {k: v for k, v in self.as_dict().items() if k not in NOT_DECIDING}

    def check(self) -> None:
        """PatcherError for values no training can run with."""
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise PatcherError("--steps, --batch-size and --lr must be positive")
        if self.accum_steps < 1:
            raise PatcherError(f"--accum-steps {self.accum_steps}: give 1 (no accumulation) or more")
        if self.batch_size % self.accum_steps:
            raise PatcherError(f"--batch-size {self.batch_size} does not split into {self.accum_steps} equal "
                               "micro-batches: choose a --batch-size that --accum-steps divides")
        if self.shots is not None and self.shots < 1:
            raise PatcherError(f"--shots {self.shots}: give at least 1 image per class")
        if self.eval_every < 0:
            raise PatcherError(f"--eval-every {self.eval_every} is negative: give 0 (never) or a number of steps")
        unknown = [name for name in self.report_to if name not in REPORTERS]
        if unknown:
            raise PatcherError(f"unknown --report-to {unknown[0]!r}: use {' or '.join(REPORTERS)}, comma-separated")
