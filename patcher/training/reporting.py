"""Curves a person can watch while a build trains (`--report-to tensorboard,wandb`), written under the run directory.

TensorBoard event files go to RUN/reports/tensorboard (`tensorboard --logdir RUN/reports`); a wandb run keeps its
files in RUN/reports/wandb, and wandb's own settings apply (`WANDB_MODE=offline` writes there without a network,
for `wandb sync` later; `WANDB_PROJECT` names the project, default "patcher"). Tags:

    train/loss, train/lr, train/grad_norm, train/images_per_s, train/<term>   every logged step (a method's terms:
                                                                             CAR-FT's cross_entropy and kl)
    heldout/<task>                                                           every --eval-every steps
    alpha_curve/<task>, alpha_curve/step<k>/<task>                           held-out accuracy against alpha, at
                                                                             step round(1000 * alpha)
    alpha/chosen                                                             at the last training step (wandb:
                                                                             in the run's summary)

The curves are for watching: their files carry wall-clock times, so the manifest's `files` leave them out.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from patcher.base.errors import PatcherError
from patcher.runs.layout import REPORTS
from patcher.training.config import REPORTERS

ALPHA_STEPS = 1000  # TensorBoard's steps are integers: alpha 0.382 is written at step 382
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Sink(Protocol):
    """Where scalars go: one TensorBoard writer or one wandb run."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record these tagged values at a training step."""

    def alpha_point(self, values: Mapping[str, float], alpha: float) -> None:
        """Record these tagged values at one alpha of a curve."""

    def summary(self, values: Mapping[str, float], step: int) -> None:
        """Record values that describe the whole run (the alpha chosen), once training is over at `step`."""

    def close(self) -> None:
        """Flush and close."""


class TensorBoardSink:
    """Event files written by torch's SummaryWriter."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """One scalar event per tag."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def alpha_point(self, values: Mapping[str, float], alpha: float) -> None:
        """At step round(1000 * alpha)."""
        self.scalars(values, round(alpha * ALPHA_STEPS))

    def summary(self, values: Mapping[str, float], step: int) -> None:
        """Scalars at the last training step."""
        self.scalars(values, step)

    def close(self) -> None:
        """Flush the events to disk and close the file."""
        self.writer.close()


class WandbSink:
    """A wandb run named after the run directory (a resumed build starts another one of the same name)."""

    def __init__(self, folder: Path, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "patcher"), name=name, dir=str(folder),
                              config=dict(config))
        self.run.define_metric("alpha")
        self.run.define_metric("alpha_curve/*", step_metric="alpha")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Logged at the training step."""
        self.run.log(dict(values), step=step)

    def alpha_point(self, values: Mapping[str, float], alpha: float) -> None:
        """Logged against the "alpha" metric."""
        self.run.log({"alpha": alpha, **values})

    def summary(self, values: Mapping[str, float], step: int) -> None:
        """In the run's summary (wandb refuses history at a step it has passed)."""
        self.run.summary.update(dict(values))

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()


def check_reporters(names: Iterable[str]) -> None:
    """PatcherError, before any work, for a reporter that is unknown or whose package is not installed."""
    for name in names:
        if name not in REPORTERS:
            raise PatcherError(f"unknown --report-to {name!r}: use {' or '.join(REPORTERS)}, comma-separated")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise PatcherError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} "
                               "(or pip install 'patcher[report]')")


def training_scalars(line: Mapping[str, Any]) -> dict[str, float]:
    """The tagged scalars of one training log line (numbers only; the stage name and step are not scalars)."""
    values = {}
    for key, value in line.items():
        if key == "val_accuracy":
            values.update({f"heldout/{task}": float(score) for task, score in value.items()})
        elif key not in ("step", "stage") and isinstance(value, int | float) and not isinstance(value, bool):
            values[f"train/{key}"] = float(value)
    return values


class Reporter:
    """Sends training log lines and alpha curves to every sink; `close` once the build is done with it."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.last_step = 0

    def log_line(self, line: Mapping[str, Any]) -> None:
        """A training log line (what `train_method` passes its `on_log`)."""
        self.last_step = int(line["step"])
        values = training_scalars(line)
        for sink in self.sinks:
            sink.scalars(values, self.last_step)

    def alpha_curve(self, curve: Mapping[float, Mapping[str, float]], chosen: float, prefix: str = "") -> None:
        """Held-out accuracy of every task at each alpha evaluated, in ascending alpha, and the alpha chosen."""
        for alpha, accuracies in sorted(curve.items()):
            values = {f"alpha_curve/{prefix}{task}": float(score) for task, score in accuracies.items()}
            for sink in self.sinks:
                sink.alpha_point(values, alpha)
        for sink in self.sinks:
            sink.summary({f"alpha/{prefix}chosen": float(chosen)}, self.last_step)

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_reporter(names: Iterable[str], run_dir: Path, run_name: str, config: Mapping[str, Any]) -> Reporter | None:
    """A reporter writing under `run_dir`/reports to each named sink; None when none is named."""
    names = list(dict.fromkeys(names))
    if not names:
        return None
    check_reporters(names)
    sinks: list[Sink] = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(run_dir / REPORTS / "tensorboard"))
    if "wandb" in names:
        sinks.append(WandbSink(run_dir / REPORTS, run_name, config))
    return Reporter(sinks)
