"""A manifest that no longer tells the truth about its weights (edited by hand) is refused before anything is
exported, with one line saying what disagrees; a damaged manifest is refused by every stage that reads it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from faults_support import hidden, the_error_line
from typer.testing import CliRunner

from patcher.base.errors import PatcherError
from patcher.base.files import FileRecord
from patcher.base.records import to_json
from patcher.cli import app
from patcher.stages.export import export_run

runner = CliRunner()


def edited(tiny_run: Path, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the run whose manifest `edit` changed."""
    run = folder / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    edit(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run


def cut_classnames(manifest: dict) -> None:
    manifest["tasks"]["digits"]["classnames"] = manifest["tasks"]["digits"]["classnames"][:3]


def other_alpha(manifest: dict) -> None:
    manifest["alpha"]["chosen"] = 0.25 if manifest["alpha"]["chosen"] != 0.25 else 0.75


def bigger_images(manifest: dict) -> None:
    manifest["model"]["preprocess"]["image_size"] = [32, 32]


def wider_embedding(manifest: dict) -> None:
    manifest["model"]["embed_dim"] += 1


EDITS = [
    (cut_classnames, r"lists 3 class names for task digits but its head in patched.safetensors has 10 outputs"),
    (other_alpha, r"patched.safetensors was interpolated with alpha \S+ but manifest.json says 0.\d+"),
    (bigger_images, r"says the input is 32x32 pixels but open_clip_config.json's .* is 28x28"),
    (wider_embedding, r"embeddings have \d+ dimensions but the digits head in patched.safetensors takes \d+"),
]


@pytest.mark.parametrize(("edit", "message"), EDITS, ids=[edit.__name__ for edit, _ in EDITS])
def test_an_edited_manifest_is_caught_against_the_weights(tiny_run: Path, tmp_path: Path, edit: Callable,
                                                          message: str) -> None:
    run = edited(tiny_run, tmp_path, edit)
    with pytest.raises(PatcherError, match=message):
        export_run(run)
    assert not (run / "onnx").exists() and hidden(run) == []


DAMAGE = [
    (lambda m: m.update(tasks={}), "no tasks"),
    (lambda m: m["model"]["preprocess"].update(image_size="large"), "model.preprocess.image_size: expected a list"),
    (lambda m: m["model"]["preprocess"].update(image_size=[0, 28]), "image_size [0, 28] is not [height, width]"),
    (lambda m: m["alpha"].update(chosen="0.5"), "alpha.chosen: expected float, found '0.5'"),
    (lambda m: m["alpha"].update(chosen=1.5), "alpha.chosen 1.5 is not a number in [0, 1]"),
    (lambda m: m["tasks"]["digits"].update(classnames=[]), "tasks.digits: no class names"),
    (lambda m: m.update(patch_tasks=["gtsrb"]), "patch_tasks names tasks the manifest does not describe"),
    (lambda m: m["training"].update(momentum=0.9), "training.momentum is not a field"),
    (lambda m: m.pop("files"), "files is missing"),
]


@pytest.mark.parametrize(("edit", "message"), DAMAGE, ids=[message for _, message in DAMAGE])
def test_a_damaged_manifest_is_one_error_line_for_export_and_show(tiny_run: Path, tmp_path: Path, edit: Callable,
                                                                   message: str) -> None:
    run = edited(tiny_run, tmp_path, edit)
    for command in (["export", str(run)], ["show", str(run)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        line = the_error_line(result.output)
        assert "damaged or was edited by hand" in line and message in line, line
    assert not (run / "onnx").exists()


def test_weights_of_another_kind_under_a_recorded_hash_are_refused(tiny_run: Path, tmp_path: Path) -> None:
    """Even with the hash made to match, zero-shot weights under the patched name are caught by their metadata."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(run / "models/zeroshot.safetensors", run / "models/patched.safetensors")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"]["models/patched.safetensors"] = to_json(FileRecord.of(run / "models/patched.safetensors"))
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["export", str(run)])
    assert result.exit_code == 2
    assert "patched.safetensors holds the zeroshot classifier, not patched" in the_error_line(result.output)
    assert not (run / "onnx").exists()
