"""Task vectors (Ilharco et al., 2023): arithmetic on the floating-point tensors of state dicts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from patcher.base.errors import PatcherError
from patcher.models.state import State

StateDict = Mapping[str, torch.Tensor]


def _check_compatible(a: StateDict, b: StateDict) -> None:
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise PatcherError(f"the two models have different architectures (keys differ: {missing} ...)")
    for key in a:
        if a[key].shape != b[key].shape:
            raise PatcherError(
                f"the two models have different architectures ({key}: {tuple(a[key].shape)} vs "
                f"{tuple(b[key].shape)})"
            )


class TaskVector:
    """theta_finetuned - theta_pretrained over floating-point tensors; integer buffers are left out."""

    def __init__(self, vector: Mapping[str, torch.Tensor]) -> None:
        self.vector = dict(vector)

    @classmethod
    def from_states(cls, pretrained: StateDict, finetuned: StateDict) -> TaskVector:
        """The task vector that takes `pretrained` to `finetuned`."""
        _check_compatible(pretrained, finetuned)
        return cls(
            {
                key: finetuned[key].detach().float() - pretrained[key].detach().float()
                for key in pretrained
                if pretrained[key].is_floating_point()
            }
        )

    def __add__(self, other: TaskVector) -> TaskVector:
        _check_compatible(self.vector, other.vector)
        return TaskVector({k: v + other.vector[k] for k, v in self.vector.items()})

    def __radd__(self, other: object) -> TaskVector:
        return self if other == 0 else NotImplemented  # lets sum() start from 0

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.vector.items()})

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector({k: v * scale for k, v in self.vector.items()})

    __rmul__ = __mul__

    def apply_to(self, pretrained: StateDict, scaling: float = 1.0) -> dict[str, torch.Tensor]:
        """pretrained + scaling * vector, in each tensor's own dtype; non-float tensors copied unchanged."""
        missing = [k for k in self.vector if k not in pretrained]
        if missing:
            raise PatcherError(f"task vector does not fit this model (no {missing[0]}): different architecture")
        result = {}
        for key, tensor in pretrained.items():
            if key in self.vector:
                result[key] = (tensor.float() + scaling * self.vector[key]).to(tensor.dtype)
            else:
                result[key] = tensor.clone()
        return result


def interpolate(zeroshot: StateDict, finetuned: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """theta(alpha) = (1 - alpha) theta_zs + alpha theta_ft (WiSE-FT); exactly theta_zs at 0 and theta_ft at 1.

    This is `TaskVector.from_states(zs, ft).apply_to(zs, alpha)`, computed with torch.lerp so that both
    end points are reproduced bit for bit.
    """
    if not 0.0 <= alpha <= 1.0:
        raise PatcherError(f"alpha {alpha} is outside [0, 1]: pass a mixing coefficient between 0 and 1")
    _check_compatible(zeroshot, finetuned)
    result = {}
    for key, start in zeroshot.items():
        if start.is_floating_point():
            result[key] = torch.lerp(start.detach(), finetuned[key].detach().to(start.dtype), alpha)
        else:
            result[key] = start.clone()
    return result


def fill_missing(states: Iterable[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor]) -> list[State]:
    """Each state completed with `base`'s values for the keys another state has and it lacks (a zero change)."""
    states = [dict(state) for state in states]
    keys = set().union(*(state.keys() for state in states))
    missing = sorted(keys - set(base))
    if missing:
        raise PatcherError(f"no base value for {missing[0]}: the states come from different architectures")
    return [{**{key: base[key] for key in keys - state.keys()}, **state} for state in states]


def task_arithmetic(base: StateDict, finetuned: list[StateDict]) -> Callable[[float], dict[str, torch.Tensor]]:
    """coefficient -> base + coefficient * sum over i of (finetuned_i - base) (Ilharco et al., 2023)."""
    total = sum(TaskVector.from_states(base, state) for state in finetuned)

    def path(coefficient: float) -> dict[str, torch.Tensor]:
        return total.apply_to(base, coefficient)

    return path
