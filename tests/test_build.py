"""`patcher build` end to end on a tiny real open_clip model, and its refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults_support import run_patcher
from safetensors import safe_open
from typer.testing import CliRunner

from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.cli import app
from patcher.runs.manifest import load_run

runner = CliRunner()


def test_run_directory_follows_the_contract(tiny_run: Path):
    run = load_run(tiny_run)
    manifest = to_json(run.manifest)
    assert manifest["patch_tasks"] == ["digits"] and manifest["support_tasks"] == ["fashion-mnist"]
    for relative in ("models/zeroshot.safetensors", "models/finetuned.safetensors", "models/patched.safetensors",
                     "alpha_curve.png", "train.log", "open_clip_config.json"):
        assert run.verified_file(relative).stat().st_size > 0
    with safe_open(str(tiny_run / "models/patched.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["alpha"] == f"{manifest['alpha']['chosen']:g}"
    assert "heads.digits" in keys and "heads.fashion-mnist" in keys
    assert any(k.startswith("visual.") for k in keys)
    assert not list(tiny_run.parent.glob(".tiny.partial*"))


def test_manifest_records_the_alpha_search(tiny_run: Path):
    alpha = to_json(load_run(tiny_run).manifest.alpha)
    alphas = [point["alpha"] for point in alpha["curve"]]
    assert alpha["evaluations"] == len(alphas) < 11
    assert 0.0 in alphas and 1.0 in alphas and alpha["chosen"] in alphas
    zeroshot_support = alpha["zeroshot_val_accuracy"]["fashion-mnist"]
    chosen = next(p for p in alpha["curve"] if p["alpha"] == alpha["chosen"])
    assert chosen["val_accuracy"]["fashion-mnist"] >= zeroshot_support - alpha["tolerance"]
    feasible = [p for p in alpha["curve"]
                if p["val_accuracy"]["fashion-mnist"] >= zeroshot_support - alpha["tolerance"]]
    assert chosen["val_accuracy"]["digits"] == max(p["val_accuracy"]["digits"] for p in feasible)


def test_test_accuracies_are_those_of_the_stored_models(tiny_run: Path):
    """Each recorded test accuracy is what the stored weights score, recomputed image by image with open_clip's
    eval transform (not through the build's data path)."""
    import torch
    from safetensors.torch import load_file

    from patcher.data.tasks import get_task
    from patcher.data.transforms import eval_transform
    from patcher.models import build_from_config
    from patcher.models.classifier import MultiHeadClassifier
    from patcher.models.state import split_classifier_state

    manifest = to_json(load_run(tiny_run).manifest)
    assert set(manifest["test_accuracy"]) == {"zeroshot", "finetuned", "patched"}
    config = json.loads((tiny_run / "open_clip_config.json").read_text())
    transform = eval_transform(config["preprocess_cfg"])
    test = get_task("digits").dataset("test")
    assert manifest["tasks"]["digits"]["sizes"]["test"] == len(test)
    images = torch.stack([transform(image) for image, _ in test])
    labels = torch.tensor([label for _, label in test])
    for kind in ("zeroshot", "patched"):
        encoder_state, heads = split_classifier_state(load_file(str(tiny_run / f"models/{kind}.safetensors")))
        encoder = build_from_config(config).visual
        encoder.load_state_dict(encoder_state)
        with torch.no_grad():
            logits = MultiHeadClassifier(encoder, {"digits": heads["digits"]})(images)["digits"]
        correct = int((logits.argmax(dim=1) == labels).sum())
        assert manifest["test_accuracy"][kind]["digits"] == pytest.approx(100.0 * correct / len(test), abs=1e-9)
    log_lines = (tiny_run / "train.log").read_text().splitlines()
    assert json.loads(log_lines[-1])["step"] == manifest["training"]["steps"]


def test_a_corrupted_file_is_caught_by_its_hash(tiny_run: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    with open(copy / "models/patched.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    from patcher.base.errors import PatcherError

    with pytest.raises(PatcherError, match="sha256"):
        load_run(copy).verified_file("models/patched.safetensors")
    assert sha256_file(tiny_run / "models/patched.safetensors") == \
        load_run(tiny_run).manifest.files["models/patched.safetensors"].sha256


def test_show_prints_the_table(tiny_run: Path):
    result = runner.invoke(app, ["show", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert "digits" in result.output and "fashion-mnist" in result.output and "alpha" in result.output


BASE = ["build", "--model", "patcher-tiny", "--pretrained", "none", "--steps", "2", "--batch-size", "8"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "nosuchtask"], "known"),
        (["--task", "digits", "--alpha", "1.5"], "outside [0, 1]"),
        (["--task", "digits", "--alpha", "lots"], "neither 'auto' nor a number"),
        (["--task", "digits", "--support", "digits"], "both the patch task and a supported task"),
        (["--task", "digits", "--method", "magic"], "unknown --method"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, arguments: list[str], message: str):
    out = tmp_path / "run"
    result = run_patcher(*BASE, *arguments, "--out", str(out), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_and_tag_are_refused(tmp_path: Path):
    for arguments, message in ((["--model", "ViT-Nope"], "unknown model"),
                               (["--model", "ViT-B-32", "--pretrained", "nonsense"], "pretrained tag")):
        result = runner.invoke(app, ["build", "--task", "digits", *arguments, "--out", str(tmp_path / "r")])
        assert result.exit_code == 2 and message in result.output


def test_offline_hub_tag_fails_at_once_with_advice(tmp_path: Path):
    import time

    started = time.perf_counter()
    result = runner.invoke(app, ["build", "--task", "digits", "--model", "ViT-B-32", "--pretrained", "openai",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--pretrained FILE" in result.output
    assert time.perf_counter() - started < 30


def test_empty_folder_dataset_is_refused_and_nothing_is_written(tmp_path: Path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    result = runner.invoke(app, [*BASE, "--task", f"folder:{tmp_path / 'data'}", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "error:" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run, no .r.partial staging, no lock


def test_resume_refuses_other_options_and_missing_state(tmp_path: Path):
    out = tmp_path / "run"
    result = runner.invoke(app, [*BASE, "--task", "digits", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output
    from patcher.base.staging import Resume, staged_output

    with pytest.raises(KeyboardInterrupt), staged_output(out, resume=Resume({"task": "something else"})) as staging:
        staging.open()
        raise KeyboardInterrupt  # an interrupted build keeps its staging for --resume
    result = runner.invoke(app, [*BASE, "--task", "digits", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "other options" in result.output
    assert not out.exists()
