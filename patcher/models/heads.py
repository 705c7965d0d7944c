"""Classification heads from the text tower: zero-shot heads (cached), and the heads a flat state implies.

A state without `text.*` keys keeps the zero-shot heads; with them, every head is rebuilt from that text
tower; a `heads.<task>` entry (a probed head) overrides both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from patcher.base.cache import cache_dir as cache_dir_for
from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.base.files import atomic_file
from patcher.data.tasks import Task
from patcher.models.clip_loader import LoadedModel
from patcher.models.state import (
    HEAD_PREFIX,
    TEXT_PREFIX,
    VISUAL_PREFIX,
    State,
    has_text,
    head_scale,
    part,
    project_head,
)


def head_key(weights_sha256: str, classnames: list[str], templates: list[str]) -> str:
    """Cache key: the model's weights digest and the exact prompts."""
    prompts = json.dumps({"classnames": list(classnames), "templates": list(templates)}, sort_keys=True)
    return hashlib.sha256(f"{weights_sha256}|{prompts}".encode()).hexdigest()[:32]


class _HeadBuilder(nn.Module):
    """open_clip's zero-shot classifier times the logit scale, as a forward, so that `functional_call` can evaluate
    it at a given text tower."""

    def __init__(self, loaded: LoadedModel, device: str) -> None:
        super().__init__()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = device

    def forward(self, classnames: list[str], templates: list[str]) -> torch.Tensor:
        open_clip = import_open_clip()  # imported (with torchvision's ops) when a head is built, not at import
        weights = open_clip.build_zero_shot_classifier(self.model, self.tokenizer, classnames, templates,
                                                       num_classes_per_batch=32, device=self.device)
        return weights * self.model.logit_scale.exp()


@torch.no_grad()
def build_head(loaded: LoadedModel, classnames: list[str], templates: list[str], device: str = "cpu",
               text: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[D, C] head: per class, the mean of normalised template embeddings, renormalised, times the logit scale;
    computed with the text tower `text` (a state's `text.*` part, unprefixed) when given, else the model's own."""
    builder = _HeadBuilder(loaded, device)
    loaded.model.to(device).eval()
    if text is None:
        return builder(list(classnames), list(templates)).float().cpu()
    weights = {f"model.{key}": value.to(device) for key, value in text.items()}
    return functional_call(builder, weights, (list(classnames), list(templates))).float().cpu()


def zero_shot_head(
    loaded: LoadedModel,
    classnames: list[str],
    templates: list[str],
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """The task's head, read from the cache when this model and these prompts were seen before."""
    cache_dir = cache_dir or cache_dir_for("heads")
    path = cache_dir / f"{head_key(loaded.weights_sha256, classnames, templates)}.safetensors"
    if path.is_file():
        return load_file(path)["head"]
    head = build_head(loaded, classnames, templates, device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temporary:
        save_file({"head": head.contiguous()}, str(temporary))
    return head


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
        """Every task's head built from this text tower (evaluated at it; the model's own weights are untouched)."""
        if self.loaded is None:
            raise PatcherError("this state has a text tower but no model was given to build heads with")
        expected = {key for key in self.loaded.model.state_dict() if not key.startswith(VISUAL_PREFIX)}
        if set(text) != expected:
            first = sorted(set(text) ^ expected)[0]
            raise PatcherError(f"text tower does not fit the model ({first}): different architecture")
        return {
            name: build_head(self.loaded, list(task.classnames), list(task.templates), self.device, text)
            for name, task in self.tasks.items()
        }
