"""Interpolable states: flat tensors named `visual.*`, `text.*` and `heads.<task>`, and the heads they imply.

A method trains some of these: the image encoder (`visual.*`), the text tower (`text.*`, FLYP), or a
task's head as a parameter (`heads.<task>`, the linear probe). Interpolation, task vectors and merging
act on such flat dicts (`patcher.patching.task_vectors`); `HeadResolver` turns any of them into what a run stores,
the encoder state and one head per task. A state without `text.*` keys keeps the zero-shot heads; with
them, every head is rebuilt from that text tower; a `heads.<task>` entry overrides both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from patcher.data.tasks import Task
from patcher.errors import PatcherError
from patcher.models import LoadedModel
from patcher.models.classifier import HEAD_PREFIX, VISUAL_PREFIX
from patcher.models.heads import build_head

TEXT_PREFIX = "text."
State = dict[str, torch.Tensor]


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> State:
    """A detached CPU copy of `state` with `prefix` on every key."""
    return {f"{prefix}{key}": value.detach().cpu().clone() for key, value in state.items()}


def part(prefix: str, state: Mapping[str, torch.Tensor]) -> State:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def visual_state(model: torch.nn.Module) -> State:
    """The image encoder of a CLIP model as `visual.*` entries."""
    return prefixed(VISUAL_PREFIX, model.visual.state_dict())


def text_state(model: torch.nn.Module) -> State:
    """Everything of a CLIP model but its image encoder (text tower, projection, logit scale) as `text.*`."""
    return prefixed(TEXT_PREFIX, {k: v for k, v in model.state_dict().items() if not k.startswith(VISUAL_PREFIX)})


def has_text(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the state carries a text tower (its heads are rebuilt from it)."""
    return any(key.startswith(TEXT_PREFIX) for key in state)


def head_tasks(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Tasks whose head is a trained parameter of this state."""
    return list(part(HEAD_PREFIX, state))


def project_head(head: torch.Tensor, scale: float) -> torch.Tensor:
    """Each class column L2-normalised and multiplied by `scale`: the form every stored head has."""
    return F.normalize(head.float(), dim=0) * scale


def head_scale(head: torch.Tensor) -> float:
    """The logit scale a stored head carries: the mean norm of its class columns."""
    return float(head.float().norm(dim=0).mean())


def fill_missing(states: Iterable[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor]) -> list[State]:
    """Each state completed with `base`'s values for the keys another state has and it lacks (a zero change)."""
    states = [dict(state) for state in states]
    keys = set().union(*(state.keys() for state in states))
    missing = sorted(keys - set(base))
    if missing:
        raise PatcherError(f"no base value for {missing[0]}: the states come from different architectures")
    return [{**{key: base[key] for key in keys - state.keys()}, **state} for state in states]


class HeadResolver:
    """Turns a state into (encoder state, head of every task); text-tower states rebuild heads with the model."""

    def __init__(
        self,
        zeroshot_heads: Mapping[str, torch.Tensor],
        tasks: Mapping[str, Task],
        loaded: LoadedModel | None = None,
        device: str = "cpu",
    ) -> None:
        self.zeroshot_heads = {task: head.float() for task, head in zeroshot_heads.items()}
        self.tasks = dict(tasks)
        self.loaded = loaded
        self.device = device
        self.scales = {task: head_scale(head) for task, head in self.zeroshot_heads.items()}

    def heads(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One head per task of the run for this state."""
        heads = self.text_heads(part(TEXT_PREFIX, state)) if has_text(state) else dict(self.zeroshot_heads)
        for task, head in part(HEAD_PREFIX, state).items():
            heads[task] = project_head(head, self.scales[task])
        return heads

    def resolve(self, state: Mapping[str, torch.Tensor]) -> tuple[State, dict[str, torch.Tensor]]:
        """(encoder state dict, heads by task): what a `models/*.safetensors` file holds."""
        return part(VISUAL_PREFIX, state), self.heads(state)

    @torch.no_grad()
    def text_heads(self, text: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every task's head built from this text tower (loaded into the model's non-visual part)."""
        if self.loaded is None:
            raise PatcherError("this state has a text tower but no model was given to build heads with")
        model = self.loaded.model
        missing, unexpected = model.load_state_dict(dict(text), strict=False)
        untouched = [key for key in missing if not key.startswith(VISUAL_PREFIX)]
        if unexpected or untouched:
            first = (unexpected or untouched)[0]
            raise PatcherError(f"text tower does not fit the model ({first}): different architecture")
        return {
            name: build_head(self.loaded, list(task.classnames), list(task.templates), self.device)
            for name, task in self.tasks.items()
        }
