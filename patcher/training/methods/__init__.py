"""Fine-tuning methods: ft, lp, lpft, flyp, carft. Each supplies stages for the shared loop and a state."""

from __future__ import annotations

import dataclasses
from typing import Any

from patcher.base.registries import Parameter, Registered, Registry
from patcher.training.config import TrainConfig
from patcher.training.methods.base import Method, MethodSetup, Stage, params_dict, parse_params
from patcher.training.methods.carft import ContextAwareFineTune
from patcher.training.methods.flyp import ContrastiveFineTune
from patcher.training.methods.ft import FineTune
from patcher.training.methods.probe import LinearProbe, LinearProbeThenFineTune


def registered(method: type[Method]) -> Registered[type[Method]]:
    """A method class as its registry entry: name, summary, reference, and its Params' fields as parameters."""
    defaults = method.Params()
    parameters = tuple(Parameter(name=field.name, default=getattr(defaults, field.name))
                       for field in dataclasses.fields(method.Params))
    return Registered(name=method.name, summary=method.summary, reference=method.reference, parameters=parameters,
                      builds=method)


METHODS: Registry[Registered[type[Method]]] = Registry("--method", [
    registered(method)
    for method in (FineTune, LinearProbe, LinearProbeThenFineTune, ContrastiveFineTune, ContextAwareFineTune)
])


def get_method(name: str) -> type[Method]:
    """The method class called `name`; PatcherError naming the nearest registered ones otherwise."""
    return METHODS.entry(name).builds


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
