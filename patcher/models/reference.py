"""The shipped reference CLIP: a small open_clip model pretrained by `patcher pretrain`, committed in the repository.

Every machine loads the same bytes. The trained tensors are stored in float16 (`reference/weights.safetensors`);
the token table, frozen during pretraining, is not stored: `token_table` regenerates it from its seed with integer
arithmetic and one exact scaling, so it is bit for bit the same on every CPU. `provenance.json` beside the
weights records how the model was made (command, seed, data, commit) and the sha256 of the whole float32 state
dict, which every load checks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from patcher.base.errors import PatcherError
from patcher.models.state import state_dict_digest

REFERENCE_NAME = "patcher-reference"
REFERENCE_DIR = Path(__file__).parent / "reference"
WEIGHTS_FILE = "weights.safetensors"
PROVENANCE_FILE = "provenance.json"
TOKEN_TABLE = "token_embedding.weight"
STORED_DTYPE = torch.float16
TOKEN_STD = 0.02  # open_clip's initialisation of the token table


def token_table(vocab_size: int, width: int, seed: int) -> torch.Tensor:
    """A [vocab, width] float32 table, uniform with open_clip's standard deviation, drawn from integers (numpy's
    PCG64) and scaled once: no floating-point step that a CPU could round differently."""
    integers = np.random.default_rng(seed).integers(-(2**15), 2**15, size=(vocab_size, width), dtype=np.int32)
    scale = np.float32(TOKEN_STD * math.sqrt(3.0) / 2**15)
    return torch.from_numpy(integers.astype(np.float32) * scale)


def stored_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the shipped file holds: everything but the token table, in float16."""
    return {key: value.detach().cpu().to(STORED_DTYPE).contiguous() for key, value in state.items()
            if key != TOKEN_TABLE}


def round_to_stored(model: torch.nn.Module) -> None:
    """Round the model's trained weights to what the shipped file can hold, in place, so that what is evaluated
    and recorded is what ships."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key != TOKEN_TABLE and value.is_floating_point():
                value.copy_(value.to(STORED_DTYPE).to(value.dtype))


def write_shipped(model: torch.nn.Module, folder: Path) -> Path:
    """Write the model's stored tensors to `folder`/weights.safetensors; the caller writes the provenance."""
    path = Path(folder) / WEIGHTS_FILE
    save_file(stored_tensors(model.state_dict()), str(path), metadata={"format": "pt"})
    return path


@cache
def provenance(folder: Path = REFERENCE_DIR) -> dict[str, Any]:
    """The shipped model's provenance record (how it was made, its hashes, its zero-shot table)."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise PatcherError(f"{path} is missing: the reference model is not in this checkout (git status shows why)")
    return json.loads(path.read_text())


def load_reference_weights(model: torch.nn.Module, folder: Path = REFERENCE_DIR) -> str:
    """Fill `model` (built from the reference config) with the shipped weights and the regenerated token table;
    return the state dict's sha256, refused unless it is the one the provenance records."""
    record = provenance(folder)
    weights_path = Path(folder) / WEIGHTS_FILE
    if not weights_path.is_file() or weights_path.stat().st_size < 1024:
        raise PatcherError(f"{weights_path} is missing or is a Git LFS pointer: fetch the repository's files whole")
    state = {key: value.float() for key, value in load_file(str(weights_path)).items()}
    table = record["token_table"]
    state[TOKEN_TABLE] = token_table(table["vocab_size"], table["width"], table["seed"])
    model.load_state_dict(state, strict=True)
    digest = state_dict_digest(model.state_dict())
    if digest != record["state_sha256"]:
        raise PatcherError(f"the reference weights under {folder} give state sha256 {digest[:12]}, not the "
                           f"{record['state_sha256'][:12]} their provenance records: the files were changed")
    return digest


def ship(pretrained: Path, folder: Path = REFERENCE_DIR) -> Path:
    """Make a `patcher pretrain` folder the shipped reference: copy its float16 weights and its record (as
    provenance.json) into `folder` and write the model card; the pretraining must have frozen the token table."""
    from patcher.base.files import atomic_file, write_json, write_text

    record = json.loads((Path(pretrained) / "pretrain.json").read_text())
    if record.get("token_table") is None or not (Path(pretrained) / WEIGHTS_FILE).is_file():
        raise PatcherError(f"{pretrained} was pretrained with a trained token table: only a frozen one ships")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / WEIGHTS_FILE) as partial:
        partial.write_bytes((Path(pretrained) / WEIGHTS_FILE).read_bytes())
    write_json(folder / PROVENANCE_FILE, record)
    write_text(folder / "MODEL_CARD.md", model_card(record))
    provenance.cache_clear()
    return folder


def model_card(record: dict[str, Any]) -> str:
    """The shipped model's card: what it is, how it was made, its hashes and its zero-shot table."""
    options = record["options"]
    train = options["train"]
    sources = ", ".join(f"{s['task']}/{s['split']} (weight {s['weight']:g}, recoloured {s.get('recolour', 0):g})"
                        for s in options["sources"])
    rows = [f"| {task} | {result['accuracy']:.2f} | {result['chance']:.2f} |"
            for task, result in record["zero_shot"].items()]
    return "\n".join([
        f"# {REFERENCE_NAME}: the shipped reference CLIP",
        "",
        f"An open_clip `{record['architecture']}` (28 px images, patch 7) pretrained offline by `patcher pretrain` "
        "with a class-level contrastive loss on captioned images of every suite task's class names in clean "
        "domains. Load it with `--model patcher-reference` (or `patcher.models.load_clip('patcher-reference')`).",
        "",
        f"- command: `{record['command']}`",
        f"- code: commit {record['commit']}",
        f"- data: {sources}",
        f"- training: {train['steps']} steps of {train['batch_size']}, lr {train['lr']:g}, weight decay "
        f"{train['weight_decay']:g}, warmup {train['warmup_steps']}, seed {train['seed']}; "
        f"{record['timings_s']['train']:.0f} s on {record.get('machine', {}).get('cpu', record['device'])}",
        f"- stored: {WEIGHTS_FILE} (float16, every tensor but the token table), sha256 "
        f"{record['files'][WEIGHTS_FILE]['sha256']}",
        f"- token table: regenerated by `{record['token_table']['rule']}` from seed {record['token_table']['seed']}",
        f"- float32 state dict sha256 (checked at every load): {record['state_sha256']}",
        "",
        "Zero-shot test accuracy (%):",
        "",
        "| task | accuracy | chance |",
        "|---|---:|---:|",
        *rows,
        "",
    ])
