"""Helpers for the fine-tuning-at-scale tests: one seeded tiny fine-tune of any method, the same in this process
and in every rank of a torchrun (tests/accumulation_worker.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from patcher.data.items import TensorItems
from patcher.data.prepared_splits import TrainSplit
from patcher.data.tasks import get_task
from patcher.models import load_clip
from patcher.models.heads import build_head
from patcher.models.state import State
from patcher.training.config import TrainConfig
from patcher.training.loop import MethodTracking, train_method
from patcher.training.methods import Method, MethodSetup, get_method, parse_params

ITEMS = 96  # one and a half batches of 64: steps cross an epoch boundary


def tiny_setup(dtype: torch.dtype = torch.float64, **config: object) -> MethodSetup:
    """patcher-tiny (seed 0) in `dtype` on 96 seeded random 28-px images of digits' 10 classes; 4 steps of batch
    64 at lr 1e-3 unless `config` says otherwise."""
    torch.manual_seed(0)
    loaded = load_clip("patcher-tiny")
    loaded.model.to(dtype)
    digits = get_task("digits")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(ITEMS, 3, 28, 28, generator=generator).to(dtype)
    labels = torch.randint(10, (ITEMS,), generator=generator)
    head = build_head(loaded, list(digits.classnames), list(digits.templates))
    settings = {"steps": 4, "batch_size": 64, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, **config}
    return MethodSetup(loaded, {"digits": TrainSplit(TensorItems(images, labels))}, {"digits": digits},
                       {"digits": head}, TrainConfig(**settings))  # type: ignore[arg-type]


def make_method(name: str, setup: MethodSetup) -> Method:
    """The method `name` with its default parameters."""
    method = get_method(name)
    return method(setup, parse_params(method, {}))


def fine_tune(name: str, setup: MethodSetup, log: list[dict] | None = None) -> State:
    """Train the method from the setup's starting weights; the state it trained."""
    method = make_method(name, setup)
    train_method(method, tracking=MethodTracking(on_log=log.append if log is not None else None))
    return method.state()


def key_bias_rows(key: str, value: torch.Tensor) -> slice | None:
    """The attention key bias inside an in_proj_bias (its gradient is zero in exact arithmetic: softmax ignores a
    constant added to every key's score)."""
    if not key.endswith("attn.in_proj_bias"):
        return None
    width = len(value) // 3
    return slice(width, 2 * width)


def max_difference(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor],
                   skip_key_bias: bool = False) -> float:
    """Largest |first - second| over every entry of two states with the same keys (key biases zeroed if asked)."""
    assert first.keys() == second.keys()
    largest = 0.0
    for key in first:
        difference = (first[key].double() - second[key].double()).abs()
        rows = key_bias_rows(key, difference) if skip_key_bias else None
        if rows is not None:
            difference[rows] = 0.0
        largest = max(largest, difference.max().item())
    return largest
