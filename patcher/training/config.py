"""The hyperparameters of one training stage (`TrainConfig`): one record, filled once, read by the loop, the
methods and the manifest. Imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are PAINT's (AdamW, lr 1e-5, wd 0.1, 500 warmup steps, batch 128, clip 1.0)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return {name: value for name, value in asdict(self).items() if name in TrainConfig.__dataclass_fields__}

    def hyperparameters(self) -> dict[str, Any]:
        """The values that change what training computes (not how often it checkpoints or logs)."""
        return {k: v for k, v in self.as_dict().items() if k not in ("checkpoint_every", "log_every")}
