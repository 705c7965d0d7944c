"""What a fine-tuning method is: the stages it trains (module, parameters, loss) and the state it yields.

The shared loop (`patcher.training.loop`: `train_method` runs every stage through `train`); a method only says
what to train and how to score a step. After training, `state()` gives the flat `visual.* / text.* /
heads.<task>` entries the method changed (see `patcher.models.state`), which the build interpolates with
the starting state.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from patcher.base.errors import PatcherError
from patcher.data.prepared_splits import TrainSplit
from patcher.data.tasks import Task
from patcher.models import LoadedModel
from patcher.models.state import State
from patcher.training.config import TrainConfig


@dataclass
class Stage:
    """One run of the training loop: the module a checkpoint saves, what is trained, and the step loss."""

    name: str
    module: nn.Module
    parameters: list[nn.Parameter]
    step_loss: Callable[[int], torch.Tensor]
    train_config: TrainConfig


@dataclass
class MethodSetup:
    """What a method starts from: the CLIP model (at the starting weights), data, heads and the main stage's
    hyperparameters."""

    loaded: LoadedModel
    train_splits: dict[str, TrainSplit]
    tasks: dict[str, Task]
    heads: dict[str, torch.Tensor]
    train_config: TrainConfig
    device: str = "cpu"


@dataclass
class NoParams:
    """A method without parameters of its own."""


class Method(ABC):
    """A fine-tuning method: a subclass declares its registry entry in its class line (`name=`, `summary=`,
    `reference=`, `trains=`, `params=`; what it leaves out it inherits) and implements `stages` and `state`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    trains: ClassVar[tuple[str, ...]]  # what `state()` holds: "visual", "text", "heads"
    Params: ClassVar[type] = NoParams

    def __init_subclass__(cls, *, name: str = "", summary: str = "", reference: str = "",
                          trains: tuple[str, ...] = (), params: type | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = {"name": name, "summary": summary, "reference": reference, "trains": trains, "Params": params}
        for attribute, value in declared.items():
            if value:
                setattr(cls, attribute, value)

    def __init__(self, setup: MethodSetup, params: Any) -> None:
        self.setup = setup
        self.params = params
        self.device = setup.device
        torch.manual_seed(setup.train_config.seed)  # what a method draws at setup is the seed's

    @classmethod
    def default_config(cls) -> TrainConfig:
        """The main stage's hyperparameters when the user gives none: PAINT's unless the method's paper differs."""
        return TrainConfig()

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The training stages, in order (LP-FT has two)."""

    @abstractmethod
    def state(self) -> State:
        """The flat entries this method trains, at their current values."""

    def step_terms(self) -> dict[str, float]:
        """The parts of the last step's loss worth logging beside it (CAR-FT's cross-entropy and KL); none here."""
        return {}

    def trained_heads(self) -> list[str]:
        """Tasks whose head this method trains as a parameter."""
        return []

    def close(self) -> None:
        """Release what training held (data loader workers)."""
        return None

    def set_grad_checkpointing(self, enable: bool) -> bool:
        """Recompute the activations of the towers this method trains in the backward pass, or stop (open_clip's
        `set_grad_checkpointing`); False when a trained tower has no checkpointing in open_clip (its ResNets)."""
        model = self.setup.loaded.model
        towers = [tower for tower in ("visual", "text") if tower in self.trains]
        if towers == ["visual", "text"]:
            model.set_grad_checkpointing(enable)
        elif towers == ["visual"]:
            model.visual.set_grad_checkpointing(enable)
        trained = [model.visual] if towers else []
        if "text" in towers:
            trained.append(model.text if hasattr(model, "text") else model.transformer)
        return not enable or all(any(getattr(module, "grad_checkpointing", False) for module in tower.modules())
                                 for tower in trained)


def parse_params(method: type[Method], raw: Mapping[str, Any]) -> Any:
    """The method's Params from KEY=VALUE strings (or values), converted to each field's type."""
    fields = {field.name: field for field in dataclasses.fields(method.Params)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise PatcherError(f"--method {method.name} has no parameter {unknown[0]!r} (its parameters: {known})")
    values = {}
    for key, value in raw.items():
        kind = type(getattr(method.Params(), key))
        try:
            values[key] = value if isinstance(value, kind) else _convert(kind, str(value))
        except (TypeError, ValueError):
            raise PatcherError(f"--param {key}={value!r}: expected a {kind.__name__}") from None
    return method.Params(**values)


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return lowered in ("true", "1", "yes")
    return kind(text)


def params_dict(params: Any) -> dict[str, Any]:
    """A method's parameters as a plain dict for the manifest."""
    return dataclasses.asdict(params)
