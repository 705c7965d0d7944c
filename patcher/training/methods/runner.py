"""Run a method's stages through the shared training loop, each resumable, with one log for all of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from patcher.errors import PatcherError
from patcher.runs.store import append_log, trim_log
from patcher.training.loop import checkpoint_step, train
from patcher.training.methods.base import Method, Stage

DONE = "done.pt"


def _freeze_all_but(stage: Stage) -> None:
    trained = {id(p) for p in stage.parameters}
    for parameter in stage.module.parameters():
        parameter.requires_grad_(id(parameter) in trained)


def run_stages(
    method: Method,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    log_path: Path | None = None,
    step_offset: int = 0,
    label: str = "",
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Train every stage in order; a finished stage is restored from its `done.pt`. Returns the steps run in all.

    Log lines number steps across stages (and across earlier calls, from `step_offset`) and name the stage.
    """
    offset = step_offset
    for index, stage in enumerate(method.stages()):
        if stage.config.steps < 1:
            raise PatcherError(f"stage {stage.name} of {method.name} has {stage.config.steps} steps: give at least 1")
        folder = checkpoint_dir / f"{label}{index}-{stage.name}" if checkpoint_dir is not None else None
        if folder is not None and (folder / DONE).is_file():
            stage.module.load_state_dict(torch.load(folder / DONE, map_location=device, weights_only=True))
            offset += stage.config.steps
            continue
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if log_path is not None:
            trim_log(log_path, offset + checkpoint_step(folder))
        _freeze_all_but(stage)
        name = f"{label}{stage.name}"

        def log(entry: dict[str, Any], offset: int = offset, name: str = name) -> None:
            line = {**entry, "step": entry["step"] + offset, "stage": name,
                    **{k: round(v, 6) for k, v in getattr(method, "last_terms", {}).items()}}
            if log_path is not None:
                append_log(log_path, line)
            if on_log is not None:
                on_log(line)

        train(stage.module, stage.parameters, stage.step_loss, stage.config, device, folder, log,
              f"{method.name} {name} on {', '.join(method.setup.train)}")
        if folder is not None:
            torch.save(stage.module.state_dict(), folder / DONE)
        offset += stage.config.steps
    for parameter in method.setup.loaded.model.parameters():
        parameter.requires_grad_(True)
    return offset - step_offset
