"""Fine-tuning methods: ft, lp, lpft, flyp, carft. Each supplies stages for the shared loop and a state."""

from __future__ import annotations

from typing import Any

from patcher.base.errors import PatcherError
from patcher.training.config import TrainConfig
from patcher.training.methods.base import Method, MethodSetup, Stage, params_dict, parse_params
from patcher.training.methods.carft import ContextAwareFineTune
from patcher.training.methods.flyp import ContrastiveFineTune
from patcher.training.methods.ft import FineTune
from patcher.training.methods.probe import LinearProbe, LinearProbeThenFineTune

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (FineTune, LinearProbe, LinearProbeThenFineTune, ContrastiveFineTune, ContextAwareFineTune)
}


def get_method(name: str) -> type[Method]:
    """The method class called `name`; PatcherError naming the available ones otherwise."""
    if name not in METHODS:
        raise PatcherError(f"unknown --method {name!r}: available: {', '.join(METHODS)}")
    return METHODS[name]


def train_config(name: str, **given: Any) -> TrainConfig:
    """The method's default hyperparameters with every option the user gave (not None) put over them."""
    config = get_method(name).default_config().as_dict()
    config.update({key: value for key, value in given.items() if value is not None})
    return TrainConfig(**config)


__all__ = [
    "METHODS",
    "Method",
    "MethodSetup",
    "Stage",
    "get_method",
    "params_dict",
    "parse_params",
    "train_config",
]
