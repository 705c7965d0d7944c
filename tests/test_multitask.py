"""Multi-task patching (joint, sequential, parallel) and `patcher merge`, end to end on a tiny CLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from methods_support import make_inverted_digits, make_small_fashion, make_tiny_model, tiny_build
from safetensors.torch import load_file
from typer.testing import CliRunner

from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.cli import app
from patcher.patching.alpha import AlphaRule
from patcher.patching.task_vectors import task_arithmetic
from patcher.runs.manifest import load_run
from patcher.stages.merge import MergeOptions, merge_runs

runner = CliRunner()
pytestmark = pytest.mark.slow
KINDS = ("zeroshot", "finetuned", "patched")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("multitask")
    return {"root": root, "model": make_tiny_model(root / "model"), "second": make_inverted_digits(root / "inverted"),
            "support": make_small_fashion(root / "fashion")}


@pytest.fixture(scope="module")
def runs(world: dict) -> dict[str, Path]:
    """Joint, sequential and parallel runs on digits + inverted digits, the two single-task runs, and their merge."""
    tasks = f"digits,{world['second']}"
    built = {strategy: tiny_build(world["model"], tasks, world["support"], world["root"] / strategy, multi=strategy)
             for strategy in ("joint", "sequential", "parallel")}
    for name, task in (("single-digits", "digits"), ("single-inverted", world["second"])):
        built[name] = tiny_build(world["model"], task, world["support"], world["root"] / name)
    built["merged"] = merge_runs(MergeOptions(runs=[built["single-digits"], built["single-inverted"]],
                                              out=world["root"] / "merged", device="cpu"))
    return built


def _visual(run: Path, kind: str) -> dict[str, torch.Tensor]:
    state = load_file(str(run / f"models/{kind}.safetensors"))
    return {k: v for k, v in state.items() if k.startswith("visual.")}


@pytest.mark.parametrize("name", ["joint", "sequential", "parallel", "merged"])
def test_one_encoder_serves_every_patch_and_supported_task(runs: dict[str, Path], world: dict, name: str):
    run = load_run(runs[name])
    tasks = ["digits", "inverted", "fashion"]  # a folder task is named by its folder
    assert run.manifest.patch_tasks == tasks[:2] and run.manifest.support_tasks == tasks[2:]
    assert run.manifest.multi is not None
    assert run.manifest.multi.strategy == ("parallel" if name == "merged" else name)
    for kind in KINDS:
        keys = load_file(str(run.verified_file(f"models/{kind}.safetensors"))).keys()
        assert all(f"heads.{task}" in keys for task in tasks)
        assert set(run.manifest.test_accuracy[kind]) == set(tasks)


def test_each_strategy_stores_the_weights_it_says(runs: dict[str, Path]):
    """joint: patched = lerp(zero-shot, fine-tuned, alpha), exactly; parallel: patched = zero-shot + c * (sum of
    task vectors), the fine-tuned model being c = 1; the strategies' patched encoders differ."""
    zeroshot, alpha = _visual(runs["joint"], "zeroshot"), load_run(runs["joint"]).manifest.alpha.chosen
    finetuned, patched = _visual(runs["joint"], "finetuned"), _visual(runs["joint"], "patched")
    assert all(torch.equal(patched[k], torch.lerp(zeroshot[k], finetuned[k], alpha)) for k in zeroshot)
    coefficient = load_run(runs["parallel"]).manifest.alpha.chosen
    base, summed = _visual(runs["parallel"], "zeroshot"), _visual(runs["parallel"], "finetuned")
    patched = _visual(runs["parallel"], "patched")
    assert all(torch.allclose(patched[k], base[k] + coefficient * (summed[k] - base[k]), atol=1e-6) for k in base)
    encoders = [_visual(runs[name], "patched") for name in ("joint", "sequential", "parallel")]
    key = next(k for k in encoders[0] if k.endswith("proj") or "weight" in k)
    assert not torch.equal(encoders[0][key], encoders[2][key]) and not torch.equal(encoders[0][key], encoders[1][key])


@pytest.mark.parametrize("name", ["joint", "sequential", "parallel", "merged"])
def test_the_chosen_alpha_is_the_rules_choice_on_the_recorded_curve(runs: dict[str, Path], name: str):
    """PAINT's rule, applied again to what the manifest recorded, chooses what the run chose (every step of a
    sequential run, its supported tasks measured against the original zero-shot accuracy)."""
    manifest = load_run(runs[name]).manifest
    alpha = manifest.alpha
    steps = [(step.curve, step.alpha) for step in alpha.steps or []] or [(alpha.curve, alpha.chosen)]
    for number, (points, chosen) in enumerate(steps):
        seen = manifest.patch_tasks[: number + 1] if alpha.steps else manifest.patch_tasks
        rule = AlphaRule(seen, manifest.support_tasks, alpha.tolerance, alpha.zeroshot_val_accuracy)
        assert rule.choose({point.alpha: point.val_accuracy for point in points}).alpha == chosen
    assert steps[-1][1] == alpha.chosen


def test_sequential_steps_start_from_the_previous_patched_model(runs: dict[str, Path]):
    alpha = to_json(load_run(runs["sequential"]).manifest.alpha)
    first, second = alpha["steps"]
    start = {p["alpha"]: p["val_accuracy"] for p in first["curve"]}
    assert start[0.0] == alpha["zeroshot_val_accuracy"]
    previous_patched = start[first["alpha"]]
    second_start = {p["alpha"]: p["val_accuracy"] for p in second["curve"]}[0.0]
    assert second_start == pytest.approx(previous_patched)
    assert alpha["chosen"] == second["alpha"]
    assert (runs["sequential"] / "alpha_curve_step2.png").is_file()


def test_parallel_searches_the_coefficient_grid(runs: dict[str, Path]):
    alpha = to_json(load_run(runs["parallel"]).manifest.alpha)
    assert alpha["evaluations"] == len(alpha["grid"]) >= 11 and alpha["search"] == "grid"
    assert alpha["parameter"] == "task-vector scaling coefficient"


def test_parallel_build_equals_merging_the_single_task_runs(runs: dict[str, Path]):
    parallel, merged = load_run(runs["parallel"]).manifest, load_run(runs["merged"]).manifest
    assert parallel.alpha.chosen == merged.alpha.chosen
    for kind in ("finetuned", "patched"):
        ours, theirs = _visual(runs["parallel"], kind), _visual(runs["merged"], kind)
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours), kind
    for kind in KINDS:
        for task, value in parallel.test_accuracy[kind].items():
            assert merged.test_accuracy[kind][task] == pytest.approx(value, abs=1e-6)


def test_merged_run_names_its_sources(runs: dict[str, Path]):
    multi = load_run(runs["merged"]).manifest.multi
    assert multi is not None and multi.merged_runs is not None
    assert [s.name for s in multi.merged_runs] == [runs["single-digits"].name, runs["single-inverted"].name]


def test_merge_refuses_other_base_weights_and_architectures(runs: dict[str, Path], tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(runs["single-inverted"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["merge", str(runs["single-digits"]), str(other), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "different base model" in result.output

    wider = tmp_path / "wider"
    shutil.copytree(runs["single-inverted"], wider)
    config = json.loads((wider / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["layers"] += 1
    (wider / "open_clip_config.json").write_text(json.dumps(config))
    manifest = json.loads((wider / "manifest.json").read_text())
    manifest["files"]["open_clip_config.json"]["sha256"] = sha256_file(wider / "open_clip_config.json")
    (wider / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["merge", str(runs["single-digits"]), str(wider), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "different architectures" in result.output
    assert not (tmp_path / "m").exists()


def test_build_cli_takes_several_tasks_and_method_params(world: dict, tmp_path: Path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["build", "--task", f"digits,{world['second']}", "--support", world["support"],
                                 "--model", world["model"], "--pretrained", "none", "--method", "carft",
                                 "--param", "kl_weight=0.5", "--multi", "joint", "--steps", "3", "--batch-size", "8",
                                 "--warmup-steps", "1", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = to_json(load_run(out).manifest)
    assert manifest["method"]["params"] == {"kl_weight": 0.5, "contexts": "task"}
    assert manifest["training"]["steps"] == 3
    assert manifest["training"]["lr"] == 1e-5  # the method's default, as --lr was not given
    bad = runner.invoke(app, ["build", "--task", "digits", "--model", world["model"], "--pretrained", "none",
                              "--param", "kl_weight", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def test_task_arithmetic_adds_disjoint_probe_heads():
    base = {"visual.w": torch.zeros(2), "heads.a": torch.ones(2), "heads.b": torch.ones(2)}
    first = {**base, "heads.a": torch.full((2,), 3.0)}
    second = {**base, "heads.b": torch.full((2,), 5.0), "visual.w": torch.ones(2)}
    path = task_arithmetic(base, [first, second])
    assert torch.equal(path(1.0)["heads.a"], first["heads.a"])
    assert torch.equal(path(1.0)["heads.b"], second["heads.b"])
    assert torch.equal(path(0.5)["visual.w"], torch.full((2,), 0.5))
    assert torch.equal(path(0.0)["heads.a"], base["heads.a"])


def test_merged_run_exports_like_any_run(runs: dict[str, Path], world: dict, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from patcher.stages.export import ExportOptions, export_run

    export = export_run(runs["merged"], ExportOptions(out=tmp_path / "onnx", images_per_task=4))
    record = json.loads((export / "export.json").read_text())
    assert set(record["tasks"]) == {"digits", "inverted", "fashion"}
