"""A run's weights and configuration, handed out only after they agree with the manifest.

File hashes prove the files are the ones the build wrote; they cannot prove that manifest.json still tells the
truth about them (a hand-edited manifest keeps its own hash). So before a stage reads weights it also checks,
from safetensors headers and open_clip_config.json alone: each head's shape against the task's class names and
the embedding width, the alpha the file was written with against the manifest's, and the input size against
the model's config. Imports no torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.tensorfile import read_header
from patcher.runs.layout import HEAD_PREFIX, OPEN_CLIP_CONFIG, VISUAL_PREFIX, model_file
from patcher.runs.manifest import Run

REMEDY = "the manifest was edited or belongs to other weights: rebuild the run (or restore its manifest.json)"


def _pair(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    return None


def verified_config(run: Run) -> dict[str, Any]:
    """open_clip_config.json, after its hash and the input size it builds the encoder for are checked."""
    config = run.verified_json(OPEN_CLIP_CONFIG)
    recorded = list(run.manifest.model.preprocess.image_size)
    sizes = {"preprocess_cfg.size": _pair(config.get("preprocess_cfg", {}).get("size")),
             "model_cfg.vision_cfg.image_size": _pair(config.get("model_cfg", {}).get("vision_cfg", {})
                                                      .get("image_size"))}
    for where, size in sizes.items():
        if size is not None and size != recorded:
            raise PatcherError(f"manifest.json says the input is {recorded[0]}x{recorded[1]} pixels but "
                               f"{OPEN_CLIP_CONFIG}'s {where} is {size[0]}x{size[1]}: {REMEDY}")
    return config


def verified_weights(run: Run, kind: str, tasks: list[str] | None = None) -> Path:
    """models/<kind>.safetensors, after its hash and its header (heads, width, alpha) are checked against the
    manifest for `tasks` (default: every task of the run)."""
    path = run.verified_file(model_file(kind))
    metadata, entries = read_header(path)
    name = path.name
    if metadata.get("model", kind) != kind:
        raise PatcherError(f"{name} holds the {metadata['model']} classifier, not {kind}: {REMEDY}")
    expected = run.manifest.alpha_of(kind)
    if "alpha" in metadata:
        try:
            written = float(metadata["alpha"])
        except ValueError:
            raise PatcherError(f"{name} records alpha {metadata['alpha']!r}, not a number: rebuild the run") from None
        if not math.isclose(written, expected, rel_tol=1e-5, abs_tol=1e-6):  # written with 6 significant digits
            raise PatcherError(f"{name} was interpolated with alpha {metadata['alpha']} but manifest.json says "
                               f"{expected:g}: {REMEDY}")
    if not any(key.startswith(VISUAL_PREFIX) for key in entries):
        raise PatcherError(f"{name} holds no image encoder ({VISUAL_PREFIX}* tensors): rebuild the run")
    width = run.manifest.model.embed_dim
    for task in run.tasks if tasks is None else tasks:
        classes = len(run.manifest.tasks[task].classnames)
        entry = entries.get(f"{HEAD_PREFIX}{task}")
        if entry is None:
            raise PatcherError(f"{name} has no head for task {task}: {REMEDY}")
        shape = list(entry.get("shape", []))
        if len(shape) != 2 or shape[1] != classes:
            outputs = shape[1] if len(shape) == 2 else shape
            raise PatcherError(f"manifest.json lists {classes} class names for task {task} but its head in {name} "
                               f"has {outputs} outputs: {REMEDY}")
        if shape[0] != width:
            raise PatcherError(f"manifest.json says embeddings have {width} dimensions but the {task} head in "
                               f"{name} takes {shape[0]}: {REMEDY}")
    return path
