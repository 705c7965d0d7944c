"""CLIP models as flat states: tensors named `visual.*`, `text.*` and `heads.<task>`.

A method trains some of these: the image encoder (`visual.*`), the text tower (`text.*`, FLYP), or a
task's head as a parameter (`heads.<task>`, the linear probe). Interpolation, task vectors and merging
act on such flat dicts (`patcher.patching.task_vectors`); a run's `models/*.safetensors` file holds
`visual.*` and one `heads.<task>` per task (`classifier_state`), every head in the stored form
scale * normalize(W) per class column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from patcher.runs.layout import HEAD_PREFIX, TEXT_PREFIX, VISUAL_PREFIX

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


def project_head(head: torch.Tensor, scale: float) -> torch.Tensor:
    """Each class column L2-normalised and multiplied by `scale`: the form every stored head has."""
    return F.normalize(head.float(), dim=0) * scale


def head_scale(head: torch.Tensor) -> float:
    """The logit scale a stored head carries: the mean norm of its class columns."""
    return float(head.float().norm(dim=0).mean())


def classifier_state(encoder_state: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]) -> dict:
    """The flat state a `models/*.safetensors` file stores: `visual.*` and `heads.<task>`."""
    state = {f"{VISUAL_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in encoder_state.items()}
    state.update({f"{HEAD_PREFIX}{task}": h.detach().cpu().float().contiguous() for task, h in heads.items()})
    return state


def split_classifier_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of `classifier_state`: (encoder state dict, heads by task)."""
    encoder = {k[len(VISUAL_PREFIX) :]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    heads = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return encoder, heads


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
