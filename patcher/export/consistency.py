"""Before anything is exported: the manifest must describe the weights it names (a hand-edited manifest is caught).

File hashes prove the weights are the ones the build wrote; they cannot prove that manifest.json itself still
tells the truth about them. These checks read only safetensors headers and open_clip_config.json: each head's
shape against the task's class names and the embedding width, the alpha each file was written with against
the manifest's, and the input size against the model's config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from patcher.errors import PatcherError
from patcher.export.metadata import model_alpha
from patcher.models.state import HEAD_PREFIX, VISUAL_PREFIX
from patcher.runs.manifest import Run
from patcher.runs.tensorfile import read_header

REMEDY = "the manifest was edited or belongs to other weights: rebuild the run (or restore its manifest.json)"


def _pair(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    return None


def check_image_size(run: Run, config: Mapping[str, Any]) -> None:
    """The manifest's input size must be the one open_clip_config.json builds the encoder for."""
    recorded = list(run.manifest["model"]["preprocess"]["image_size"])
    sizes = {"preprocess_cfg.size": _pair(config.get("preprocess_cfg", {}).get("size")),
             "model_cfg.vision_cfg.image_size": _pair(config.get("model_cfg", {}).get("vision_cfg", {})
                                                      .get("image_size"))}
    for where, size in sizes.items():
        if size is not None and size != recorded:
            raise PatcherError(f"manifest.json says the input is {recorded[0]}x{recorded[1]} pixels but "
                               f"open_clip_config.json's {where} is {size[0]}x{size[1]}: {REMEDY}")


def check_weights(run: Run, kind: str, path: Path, tasks: list[str]) -> None:
    """The file's heads fit the manifest's class names and embedding width; its alpha is the manifest's."""
    metadata, entries = read_header(path)
    name = path.name
    if metadata.get("model", kind) != kind:
        raise PatcherError(f"{name} holds the {metadata['model']} classifier, not {kind}: {REMEDY}")
    expected = model_alpha(run, kind)
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
    width = run.manifest["model"]["embed_dim"]
    for task in tasks:
        classes = len(run.manifest["tasks"][task]["classnames"])
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


def check_run(run: Run, config: Mapping[str, Any], weights: Mapping[str, Path], tasks: list[str]) -> None:
    """Every check above, for each classifier about to be exported."""
    check_image_size(run, config)
    for kind, path in weights.items():
        check_weights(run, kind, path, tasks)
