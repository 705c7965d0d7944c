"""The shipped reference model: the same bytes on every machine, its provenance, how `patcher pretrain` makes one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faults_support import run_patcher

from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.models import load_clip, state_dict_digest
from patcher.models.reference import (
    PROVENANCE_FILE,
    REFERENCE_DIR,
    REFERENCE_NAME,
    TOKEN_STD,
    WEIGHTS_FILE,
    load_reference_weights,
    provenance,
    ship,
    token_table,
)

MAX_SHIPPED_BYTES = 20 * 1024 * 1024


@pytest.mark.slow
def test_the_shipped_model_loads_to_the_state_its_provenance_records():
    """Every load rebuilds the float32 state from the float16 file and the seeded token table and checks its sha256:
    the same on every CPU, since no step of it rounds differently on one."""
    record = provenance()
    loaded = load_clip(REFERENCE_NAME)
    assert loaded.name == REFERENCE_NAME and loaded.pretrained is None
    assert loaded.weights_sha256 == record["state_sha256"] == state_dict_digest(loaded.model.state_dict())
    assert sha256_file(REFERENCE_DIR / WEIGHTS_FILE) == record["files"][WEIGHTS_FILE]["sha256"]
    assert (REFERENCE_DIR / WEIGHTS_FILE).stat().st_size <= MAX_SHIPPED_BYTES
    # `patcher build --model patcher-reference` passes build's default tag: like a local-dir: folder, it is ignored
    assert load_clip(REFERENCE_NAME, "openai").weights_sha256 == record["state_sha256"]
    with pytest.raises(PatcherError, match="trained at 28 px"):
        load_clip(REFERENCE_NAME, image_size=224)
    assert loaded.model_cfg == json.loads((Path(__file__).parents[1] / "patcher/models/configs" /
                                           f"{record['architecture']}.json").read_text())


def test_the_token_table_is_integers_scaled_once():
    """The regenerated table is k * scale for integers |k| <= 2^15 (exact in float32), uniform with open_clip's
    standard deviation, and the same for the same seed."""
    table = token_table(1000, 64, seed=3)
    scale = np.float32(TOKEN_STD * np.sqrt(3.0) / 2**15)
    steps = table.numpy().astype(np.float64) / float(scale)
    assert np.abs(steps - np.round(steps)).max() < 1e-2 and np.abs(steps).max() <= 2**15
    assert abs(float(table.std()) - TOKEN_STD) < 1e-3
    assert torch.equal(table, token_table(1000, 64, seed=3)) and not torch.equal(table, token_table(1000, 64, 4))


@pytest.mark.slow
def test_changed_weights_are_refused_with_one_line(tmp_path: Path):
    folder = tmp_path / "reference"
    shutil.copytree(REFERENCE_DIR, folder)
    weights = bytearray((folder / WEIGHTS_FILE).read_bytes())
    weights[-3] ^= 0x40  # a bit of the last tensor's data, past the header
    (folder / WEIGHTS_FILE).write_bytes(bytes(weights))
    model = load_clip(provenance()["architecture"]).model
    with pytest.raises(PatcherError, match="the files were changed"):
        load_reference_weights(model, folder)


@pytest.mark.slow
def test_patcher_show_prints_the_provenance():
    result = run_patcher("show", REFERENCE_NAME, timeout=120)
    assert result.returncode == 0, result.stderr
    record = provenance()
    assert record["state_sha256"] in result.stdout and record["command"] in result.stdout
    assert "digits" in result.stdout and "zero-shot" in result.stdout.lower()


def test_a_short_pretraining_ships_a_model_that_loads_bit_for_bit(tiny_clip: Path, tmp_path: Path):
    """`patcher pretrain` writes the float16 file and a record that `ship` turns into a reference folder; loading
    that folder gives exactly the state pretraining evaluated."""
    folder = ship(tiny_clip, tmp_path / "shipped")
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    assert (folder / "MODEL_CARD.md").read_text().count(record["state_sha256"]) == 1
    model = load_clip(record["architecture"]).model
    assert load_reference_weights(model, folder) == record["state_sha256"]
    evaluated = load_clip(f"local-dir:{tiny_clip}")
    assert evaluated.weights_sha256 == record["state_sha256"]
    provenance.cache_clear()
