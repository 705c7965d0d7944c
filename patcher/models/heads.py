"""Zero-shot classification heads from the text tower, cached on disk by model weights and task."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patcher.compat import import_open_clip
from patcher.models import LoadedModel

open_clip = import_open_clip()


def default_cache_dir() -> Path:
    """Where heads are cached: $PATCHER_CACHE/heads, else ~/.cache/patcher/heads."""
    root = os.environ.get("PATCHER_CACHE") or Path.home() / ".cache" / "patcher"
    return Path(root) / "heads"


def head_key(weights_sha256: str, classnames: list[str], templates: list[str]) -> str:
    """Cache key: the model's weights digest and the exact prompts."""
    prompts = json.dumps({"classnames": list(classnames), "templates": list(templates)}, sort_keys=True)
    return hashlib.sha256(f"{weights_sha256}|{prompts}".encode()).hexdigest()[:32]


@torch.no_grad()
def build_head(loaded: LoadedModel, classnames: list[str], templates: list[str], device: str = "cpu") -> torch.Tensor:
    """[D, C] head: per class, the mean of normalised template embeddings, renormalised, times the logit scale."""
    model = loaded.model.to(device).eval()
    weights = open_clip.build_zero_shot_classifier(
        model, loaded.tokenizer, list(classnames), list(templates), num_classes_per_batch=32, device=device
    )
    return (weights * model.logit_scale.exp()).float().cpu()


def zero_shot_head(
    loaded: LoadedModel,
    classnames: list[str],
    templates: list[str],
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """The task's head, read from the cache when this model and these prompts were seen before."""
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"{head_key(loaded.weights_sha256, classnames, templates)}.safetensors"
    if path.is_file():
        return load_file(path)["head"]
    head = build_head(loaded, classnames, templates, device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"head": head.contiguous()}, str(temporary))
    os.replace(temporary, path)
    return head
