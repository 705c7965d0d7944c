"""`patcher build --method ...` end to end on a tiny CLIP: every method writes a run that keeps the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from methods_support import make_small_fashion, make_tiny_model, tiny_build
from safetensors import safe_open
from safetensors.torch import load_file

from patcher.base.records import to_json
from patcher.data.tasks import get_task
from patcher.models import load_clip
from patcher.models.heads import build_head
from patcher.models.state import split_classifier_state
from patcher.runs.manifest import load_run
from patcher.training.methods import METHODS

KINDS = ("zeroshot", "finetuned", "patched")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("methods")
    return {"model": make_tiny_model(root / "model"), "support": make_small_fashion(root / "fashion"), "root": root}


@pytest.fixture(scope="module")
def runs(world: dict) -> dict[str, Path]:
    """One run per method (alpha fixed at 0.5 for flyp, so the patched heads differ from both ends)."""
    built = {}
    for name in METHODS:
        extra: dict = {"method_params": {"lp_steps": 6}} if name == "lpft" else {}
        if name == "flyp":
            extra["alpha"] = "0.5"
        built[name] = tiny_build(world["model"], "digits", world["support"], world["root"] / f"run-{name}", name,
                                 **extra)
    return built


def _models(run: Path) -> dict[str, tuple[dict, dict]]:
    return {kind: split_classifier_state(load_file(str(run / f"models/{kind}.safetensors"))) for kind in KINDS}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_writes_a_run_that_keeps_the_contract(runs: dict[str, Path], world: dict, method: str):
    run = load_run(runs[method])
    manifest = to_json(run.manifest)
    assert manifest["method"]["name"] == method and manifest["method"]["trains"] == list(METHODS[method].builds.trains)
    tasks = ["digits", "fashion"]  # the support folder task is named by its folder
    for kind in KINDS:
        path = run.verified_file(f"models/{kind}.safetensors")
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
            assert handle.metadata()["model"] == kind
        assert all(f"heads.{task}" in keys for task in tasks) and any(k.startswith("visual.") for k in keys)
        assert set(manifest["test_accuracy"][kind]) == set(tasks)
    lines = [json.loads(line) for line in (runs[method] / "train.log").read_text().splitlines()]
    assert lines[-1]["step"] == manifest["training"]["total_steps"]


def test_lp_run_keeps_the_encoder_and_interpolates_the_head(runs: dict[str, Path], world: dict):
    models = _models(runs["lp"])
    zeroshot, finetuned = models["zeroshot"], models["finetuned"]
    assert all(torch.equal(zeroshot[0][k], finetuned[0][k]) for k in zeroshot[0])
    assert not torch.allclose(zeroshot[1]["digits"], finetuned[1]["digits"])
    assert torch.equal(zeroshot[1]["fashion"], finetuned[1]["fashion"])
    norms = zeroshot[1]["digits"].norm(dim=0)
    for kind in KINDS:
        assert torch.allclose(models[kind][1]["digits"].norm(dim=0), norms, rtol=1e-4)
    assert load_run(runs["lp"]).manifest.method.head_tasks == ["digits"]


def test_lpft_run_trains_two_stages(runs: dict[str, Path]):
    manifest = to_json(load_run(runs["lpft"]).manifest)
    assert [s["stage"] for s in manifest["training"]["stages"]] == ["lp", "ft"]
    assert manifest["training"]["stages"][0]["lr"] == 1e-3 and manifest["method"]["params"]["lp_steps"] == 6
    stages = {json.loads(line)["stage"] for line in (runs["lpft"] / "train.log").read_text().splitlines()}
    assert stages == {"lp", "ft"}


def test_flyp_heads_come_from_the_interpolated_text_tower(runs: dict[str, Path], world: dict):
    run = load_run(runs["flyp"])
    assert run.manifest.text_tower.trained and run.manifest.alpha.chosen == 0.5
    loaded = load_clip(world["model"])
    tasks = {"digits": get_task("digits"), "fashion": get_task(world["support"])}
    models = _models(runs["flyp"])
    for kind in ("finetuned", "patched"):
        loaded.model.load_state_dict(load_file(str(run.verified_file(f"text/{kind}.safetensors"))), strict=False)
        for name, task in tasks.items():
            expected = build_head(loaded, list(task.classnames), list(task.templates))
            assert torch.allclose(models[kind][1][name], expected, atol=1e-5), (kind, name)
    assert not torch.allclose(models["patched"][1]["digits"], models["zeroshot"][1]["digits"])


def test_carft_records_its_parameters_and_logs_both_terms(runs: dict[str, Path]):
    assert load_run(runs["carft"]).manifest.method.params == {"kl_weight": 1.0, "contexts": "task"}
    first = json.loads((runs["carft"] / "train.log").read_text().splitlines()[0])
    assert first["kl"] == pytest.approx(0.0, abs=1e-5) and first["cross_entropy"] > 0


def test_an_interrupted_two_stage_build_resumes_to_the_same_weights(runs: dict[str, Path], world: dict,
                                                                     monkeypatch: pytest.MonkeyPatch):
    import patcher.training.loop as runner_module

    real_append = runner_module.append_json_line

    def interrupt_in_fine_tuning(path: Path, entry: dict) -> None:
        real_append(path, entry)
        if entry["stage"] == "ft" and entry["step"] == 6 + 5:  # after the FT stage's checkpoint at its step 4
            raise KeyboardInterrupt  # Ctrl-C: the staging directory is kept for --resume

    out = world["root"] / "resumed-lpft"
    monkeypatch.setattr(runner_module, "append_json_line", interrupt_in_fine_tuning)
    with pytest.raises(KeyboardInterrupt):
        tiny_build(world["model"], "digits", world["support"], out, "lpft", method_params={"lp_steps": 6})
    monkeypatch.setattr(runner_module, "append_json_line", real_append)
    tiny_build(world["model"], "digits", world["support"], out, "lpft", method_params={"lp_steps": 6}, resume=True)
    straight, resumed = _models(runs["lpft"])["finetuned"], _models(out)["finetuned"]
    assert all(torch.equal(straight[0][k], resumed[0][k]) for k in straight[0])
    assert torch.equal(straight[1]["digits"], resumed[1]["digits"])
    steps = [json.loads(line)["step"] for line in (out / "train.log").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12
