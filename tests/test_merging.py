"""`patcher merge --method` and the parallel strategy's merge methods, end to end on a tiny CLIP and real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from methods_support import make_inverted_digits, make_small_fashion, make_tiny_model, tiny_build
from safetensors.torch import load_file
from typer.testing import CliRunner

from patcher.base.records import to_json
from patcher.cli import app
from patcher.patching.alpha import AlphaRule
from patcher.patching.merge_search import MergeRule, MergeSpec
from patcher.runs.manifest import load_run
from patcher.stages import merge as merge_stage
from patcher.stages.merge import MergeOptions, merge_runs

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("merging")
    model = make_tiny_model(root / "model")
    second, support = make_inverted_digits(root / "inverted"), make_small_fashion(root / "fashion")
    runs = [tiny_build(model, task, support, root / f"run-{name}")
            for name, task in (("digits", "digits"), ("inverted", second))]
    return {"root": root, "model": model, "second": second, "support": support, "runs": runs}


def _merge(world: dict, name: str, spec: MergeSpec, **extra: object) -> Path:
    return merge_runs(MergeOptions(runs=world["runs"], out=world["root"] / name, device="cpu", merge=spec,
                                   **extra))  # type: ignore[arg-type]


def test_ties_merge_records_its_method_and_choice_and_exports(world: dict, tmp_path: Path):
    run = _merge(world, "ties", MergeSpec("ties", {"density": 0.2}))
    manifest = load_run(run).manifest
    merge = manifest.multi.merge
    assert merge.method == "ties" and merge.params == {"density": 0.2}
    assert "prateeky2806/ties-merging" in merge.reference and manifest.method.reference == merge.reference
    assert [s.manifest_sha256 for s in manifest.multi.merged_runs] == [load_run(r).manifest_sha256
                                                                        for r in world["runs"]]
    own = {task: load_run(r).manifest.test_accuracy["finetuned"][task] for r in world["runs"]
           for task in load_run(r).manifest.patch_tasks}
    assert merge.own_test_accuracy == pytest.approx(own, abs=1e-6)  # each task under its own fine-tune, re-measured
    patched = manifest.test_accuracy["patched"]
    assert merge.test_retained == pytest.approx({t: patched[t] / own[t] for t in own}, abs=1e-5)
    assert merge.worst_task == min(merge.test_retained, key=merge.test_retained.get)
    alpha = manifest.alpha
    rule = AlphaRule(manifest.patch_tasks, manifest.support_tasks, alpha.tolerance, alpha.zeroshot_val_accuracy)
    assert rule.choose({p.alpha: p.val_accuracy for p in alpha.curve}).alpha == alpha.chosen
    assert merge.settings[0].coefficient == alpha.chosen

    from patcher.stages.export import ExportOptions, export_run

    export = export_run(run, ExportOptions(out=tmp_path / "onnx", images_per_task=4))
    assert set(json.loads((export / "export.json").read_text())["tasks"]) == set(manifest.tasks)


def test_stored_weights_are_the_method_applied_to_the_runs(world: dict):
    """The merged run's weights are zero-shot + c * TIES(task vectors), recomputed here from the runs' files."""
    from patcher.patching.merge_methods import ties_delta
    from patcher.patching.sources import StateVectors

    run = world["root"] / "ties"
    manifest = load_run(run).manifest
    zeroshot = {k: v for k, v in load_file(str(run / "models/zeroshot.safetensors")).items() if k.startswith("visual.")}
    finetuned = [{k: v for k, v in load_file(str(r / "models/finetuned.safetensors")).items() if k in zeroshot}
                 for r in world["runs"]]
    delta = ties_delta(StateVectors(zeroshot, finetuned), {"density": 0.2}, 0)
    patched = load_file(str(run / "models/patched.safetensors"))
    for key, base in zeroshot.items():
        assert torch.allclose(patched[key], base + manifest.alpha.chosen * delta[key], atol=1e-6), key


def _shuffling_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held-out labels of the patch tasks permuted after the real splits are prepared."""
    real = merge_stage.prepare_splits

    def prepare(*args, **kwargs):
        splits = real(*args, **kwargs)
        rng = np.random.default_rng(0)
        for name, store in splits.val.items():
            if not name.startswith("folder:") or "inverted" in name:
                store.labels = rng.permutation(store.labels)
        return splits

    monkeypatch.setattr(merge_stage, "prepare_splits", prepare)


@pytest.mark.parametrize("method", ["layerwise", "layerwise-labelled"])
def test_layerwise_coefficients_read_labels_only_when_labelled(world: dict, monkeypatch: pytest.MonkeyPatch,
                                                               method: str):
    """AdaMerging's entropy never reads a label: shuffled held-out labels give the same coefficients; the labelled
    variant learns others."""
    params = {"steps": 3, "lr": 0.05}
    plain = load_run(_merge(world, f"{method}-plain", MergeSpec(method, params))).manifest.multi.merge
    _shuffling_labels(monkeypatch)
    shuffled = load_run(_merge(world, f"{method}-shuffled", MergeSpec(method, params))).manifest.multi.merge
    assert plain.layerwise is not None and len(next(iter(plain.layerwise.values()))) >= 3  # several blocks
    assert any(value != 0.3 for row in plain.layerwise.values() for value in row.values())  # it learnt something
    if method == "layerwise":
        assert shuffled.layerwise == plain.layerwise
    else:
        assert shuffled.layerwise != plain.layerwise


def test_merge_rule_bounds_the_retained_share():
    """Without a bound the best mean wins (0.5); with --min-retained 0.6, 0.5 leaves b at 40/90 of its own
    fine-tune and is refused, so 1.0 (a at 55/90) wins; nothing qualifying gives a warning."""
    curve = {0.0: {"a": 10.0, "b": 10.0, "s": 50.0}, 0.5: {"a": 80.0, "b": 40.0, "s": 50.0},
             1.0: {"a": 55.0, "b": 60.0, "s": 50.0}}
    own = {"a": 90.0, "b": 90.0}
    assert MergeRule(["a", "b"], ["s"], own=own).choose(curve).alpha == 0.5
    bounded = MergeRule(["a", "b"], ["s"], own=own, min_retained=0.6)
    assert bounded.choose(curve).alpha == 1.0 and bounded.choose(curve).warning is None
    assert "0.6 of its own fine-tune" in bounded.describe()
    assert MergeRule(["a", "b"], own=own).worst_retained(curve[0.5]) == pytest.approx(40 / 90)
    assert MergeRule(["a", "b"], ["s"], own=own, min_retained=0.95).choose(curve).warning is not None


def test_parallel_build_with_a_merge_method(world: dict, tmp_path: Path):
    run = tiny_build(world["model"], f"digits,{world['second']}", world["support"], tmp_path / "dare",
                     multi="parallel", merge=MergeSpec("dare", {"drop": 0.5}, seed=3))
    merge = load_run(run).manifest.multi.merge
    assert merge.method == "dare" and merge.params == {"drop": 0.5} and merge.seed == 3
    assert set(merge.own_val_accuracy) == {"digits", "inverted"}  # a folder task is named by its folder


def test_parallel_build_with_a_nullspace_method(world: dict, tmp_path: Path):
    """The parallel strategy protects its supported task from the zero-shot encoder's inputs, though the shared
    model was trained in place."""
    run = tiny_build(world["model"], f"digits,{world['second']}", world["support"], tmp_path / "nullspace",
                     multi="parallel", merge=MergeSpec("task-arithmetic-nullspace", {"energy": 0.8}))
    merge = load_run(run).manifest.multi.merge
    assert merge.method == "task-arithmetic-nullspace" and merge.params == {"energy": 0.8}


def test_bad_merge_options_are_one_error_line(world: dict, tmp_path: Path):
    runs = [str(r) for r in world["runs"]]
    cases = [(["--method", "slerp"], "unknown merge method"), (["--method", "ties", "--param", "drop=0.5"],
             "no such parameter"), (["--param", "density"], "KEY=VALUE"), (["--min-retained", "1.5"], "(0, 1]")]
    for extra, message in cases:
        result = runner.invoke(app, ["merge", *runs, "--out", str(tmp_path / "m"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "m").exists()
    result = runner.invoke(app, ["build", "--task", "digits", "--model", world["model"], "--pretrained", "none",
                                 "--merge-method", "ties", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--multi parallel" in result.output and not (tmp_path / "b").exists()
    listing = runner.invoke(app, ["merge-methods"])
    assert listing.exit_code == 0 and "breadcrumbs" in listing.output and "grid 0.1, 0.2, 0.5" in listing.output


def test_merge_cli_runs_a_method(world: dict, tmp_path: Path):
    runs = [str(r) for r in world["runs"]]
    result = runner.invoke(app, ["merge", *runs, "--out", str(tmp_path / "c"), "--method", "consensus",
                                 "--param", "tall_lambda=0.6", "--min-retained", "0.5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    merge = to_json(load_run(tmp_path / "c").manifest.multi.merge)
    assert merge["method"] == "consensus" and merge["min_retained"] == 0.5
    assert merge["params"] == {"tall_lambda": 0.6, "agreement": 2}


def test_wudi_merge_through_the_cli_stores_the_method_applied_to_the_runs(world: dict, tmp_path: Path):
    """`patcher merge --method wudi`: the manifest names WUDI-Merging and its parameters, and the stored weights are
    zero-shot + c * WUDI(task vectors), recomputed here from the runs' files."""
    from patcher.patching.merge_methods import wudi_delta
    from patcher.patching.sources import StateVectors

    runs = [str(r) for r in world["runs"]]
    result = runner.invoke(app, ["merge", *runs, "--out", str(tmp_path / "w"), "--method", "wudi", "--param",
                                 "steps=20", "--param", "lr=0.001", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = load_run(tmp_path / "w").manifest
    merge = manifest.multi.merge
    assert merge.method == "wudi" and merge.params == {"steps": 20, "lr": 0.001}
    assert "arXiv:2503.08099" in merge.reference and "WUDI-Merging" in merge.reference
    zeroshot = {k: v for k, v in load_file(str(tmp_path / "w/models/zeroshot.safetensors")).items()
                if k.startswith("visual.")}
    finetuned = [{k: v for k, v in load_file(str(r / "models/finetuned.safetensors")).items() if k in zeroshot}
                 for r in world["runs"]]
    delta = wudi_delta(StateVectors(zeroshot, finetuned), {"steps": 20, "lr": 0.001}, 0)
    patched = load_file(str(tmp_path / "w/models/patched.safetensors"))
    for key, base in zeroshot.items():
        assert torch.allclose(patched[key], base + manifest.alpha.chosen * delta[key], atol=1e-6), key


def test_nullspace_merge_projects_only_linear_maps(world: dict):
    """`task-arithmetic-nullspace`: the manifest names the method, its energy and AlphaEdit; the stored change is
    c * task arithmetic on norms and embeddings and smaller on every linear map (projected)."""
    from patcher.patching.merge_methods import task_arithmetic_delta
    from patcher.patching.sources import StateVectors

    run = _merge(world, "nullspace", MergeSpec("task-arithmetic-nullspace", {"energy": 0.99}))
    manifest = load_run(run).manifest
    merge = manifest.multi.merge
    assert merge.method == "task-arithmetic-nullspace" and merge.params == {"energy": 0.99}
    assert "arXiv:2410.02355" in merge.reference and manifest.support_tasks
    zeroshot = {k: v for k, v in load_file(str(run / "models/zeroshot.safetensors")).items() if k.startswith("visual.")}
    finetuned = [{k: v for k, v in load_file(str(r / "models/finetuned.safetensors")).items() if k in zeroshot}
                 for r in world["runs"]]
    delta = task_arithmetic_delta(StateVectors(zeroshot, finetuned), {}, 0)
    patched = load_file(str(run / "models/patched.safetensors"))
    coefficient = manifest.alpha.chosen
    assert coefficient > 0
    for key, base in zeroshot.items():
        change = patched[key] - base
        if base.dim() >= 2 and "embedding" not in key:
            assert float(change.norm()) < coefficient * float(delta[key].norm()) - 1e-6, key
        elif not key.endswith("bias"):
            assert torch.allclose(change, coefficient * delta[key], atol=1e-6), key
