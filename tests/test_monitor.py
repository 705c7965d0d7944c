"""What patching breaks, measured: per-task tolerances, monitored tasks, macro-F1 / worst-class / per-class scores.

Rule and metric tests run on constructed curves and counts; the end-to-end test builds a tiny real run with a
supported task that has its own tolerance and a monitored task, and reads what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from patcher.base.errors import PatcherError
from patcher.base.records import to_json
from patcher.cli import app
from patcher.data.metrics import Scores, confusion_matrix
from patcher.patching.alpha import DEFAULT_GRID, AlphaRule, golden_search, grid_search, parse_support
from patcher.runs.manifest import load_run, read_manifest
from patcher.runs.per_class import read_per_class

runner = CliRunner()


def curves(**tasks: list[float]) -> dict[float, dict[str, float]]:
    return {alpha: {name: values[i] for name, values in tasks.items()} for i, alpha in enumerate(DEFAULT_GRID)}


# Patch accuracy rises with alpha. "strict" (zero-shot 80) is >= 79 up to alpha 0.4 and >= 77.5 up to 0.7;
# "loose" (zero-shot 60) is >= 59 up to 0.5 and >= 57 up to 0.8; "monitored" collapses and must not matter.
CURVE = curves(
    p=[30, 45, 58, 68, 75, 80, 84, 87, 89, 90, 90.5],
    strict=[80, 80, 79.9, 79.7, 79.2, 78.8, 78.3, 77.5, 76.8, 76, 75],
    loose=[60, 60, 59.9, 59.8, 59.6, 59.2, 58.5, 58.0, 57.5, 56.5, 55],
    monitored=[90, 85, 75, 60, 40, 20, 10, 5, 5, 5, 5],
)


@pytest.mark.parametrize(("tolerances", "chosen"), [
    ({}, 0.4),  # 1 point for both: strict binds (78.8 at 0.5 < 79)
    ({"strict": 0.5}, 0.3),  # strict's own 0.5 points: 79.2 at 0.4 < 79.5
    ({"strict": 2.5}, 0.5),  # strict may lose 2.5 points; now loose's default 1 point binds (58.5 at 0.6 < 59)
    ({"strict": 2.5, "loose": 3}, 0.7),  # both loosened: strict binds again (76.8 at 0.8 < 77.5)
    ({"loose": 5}, 0.4),  # loosening the task that does not bind changes nothing
    ({"loose": 0.3}, 0.3),  # tightening it below its loss at 0.4 (0.4 points) does
])
def test_a_per_task_tolerance_changes_the_chosen_alpha_where_it_should(tolerances, chosen) -> None:
    rule = AlphaRule(["p"], ["strict", "loose"], 1.0, tolerances=tolerances)
    assert rule.choose(CURVE).alpha == chosen
    assert grid_search(lambda a: CURVE[a], rule).alpha == chosen
    assert golden_search(lambda a: CURVE[a], rule).alpha == chosen
    assert rule.violation(CURVE[chosen], CURVE[0.0]) == 0


def test_monitored_tasks_never_move_the_choice() -> None:
    rule = AlphaRule(["p"], ["strict", "loose"], 1.0)
    without = {a: {k: v for k, v in row.items() if k != "monitored"} for a, row in CURVE.items()}
    assert rule.choose(CURVE).alpha == rule.choose(without).alpha == 0.4  # the monitored task fell 50 points
    assert golden_search(lambda a: CURVE[a], rule).curve[0.4]["monitored"] == 40  # measured, kept on the curve


def test_the_rule_names_each_tolerance_and_keeps_its_old_words_without_them() -> None:
    plain = AlphaRule(["p"], ["strict", "loose"], 1.0, tolerances={"strict": 1.0, "loose": 1.0})
    assert plain.describe() == AlphaRule(["p"], ["strict", "loose"], 1.0).describe()
    assert "(strict, loose) keeping accuracy >= its zero-shot accuracy - 1 points" in plain.describe()
    own = AlphaRule(["p"], ["strict", "loose"], 1.0, tolerances={"strict": 0.5, "loose": 2})
    assert "its tolerance in points (strict 0.5, loose 2)" in own.describe()


def test_support_entries_parse_names_and_tolerances() -> None:
    assert parse_support(["imagenet:0.5", "cars:2", "dtd"], 1.0) == (
        ["imagenet", "cars", "dtd"], {"imagenet": 0.5, "cars": 2.0, "dtd": 1.0})
    assert parse_support(["folder:/data/x", "folder:/data/y:3"], 1.5) == (
        ["folder:/data/x", "folder:/data/y"], {"folder:/data/x": 1.5, "folder:/data/y": 3.0})
    assert parse_support(["folder:/a:b"], 1.0) == (["folder:/a:b"], {"folder:/a:b": 1.0})  # a colon in a path
    for bad, words in ((["cars:x"], "is not a number"), (["cars:-1"], ">= 0"), (["cars", "cars:2"], "twice")):
        with pytest.raises(PatcherError, match=words):
            parse_support(bad, 1.0)


# --- metrics from confusion matrices --------------------------------------------------------------------------


def test_scores_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for classes in (2, 5, 10):
        labels = rng.integers(0, classes, 300)
        predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, classes, 300))
        predicted[predicted == classes - 1] = 0  # one class never predicted: its F1 is 0
        scores = Scores(confusion_matrix(labels, predicted, classes))
        assert scores.accuracy == pytest.approx(100 * (labels == predicted).mean())
        assert scores.macro_f1 == pytest.approx(100 * f1_score(labels, predicted, average="macro", zero_division=0))
        recalls = [100 * (predicted[labels == c] == c).mean() for c in range(classes)]
        assert scores.per_class == pytest.approx(recalls) and scores.worst_class_accuracy == pytest.approx(min(recalls))


def test_classes_without_images_are_left_out_of_worst_class_and_per_class_is_null() -> None:
    scores = Scores(confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]), 4))
    assert scores.per_class == [100.0, 50.0, None, None] and scores.worst_class_accuracy == 50.0
    # scikit-learn averages F1 over the labels that occur as truth or prediction: classes 0 and 1 here
    assert scores.macro_f1 == pytest.approx(100 * f1_score([0, 0, 1, 1], [0, 0, 1, 0], average="macro"))


# --- end to end: a tiny run with a per-task tolerance and a monitored task ------------------------------------


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> Path:
    from patcher.stages.build import BuildOptions, build
    from patcher.training.config import TrainConfig

    out = tmp_path_factory.mktemp("monitor") / "run"
    return build(BuildOptions(
        task="digits", support=["count-objects:2"], monitor=["printed-digits"], model=f"local-dir:{tiny_clip}",
        pretrained=None, train_config=TrainConfig(steps=20, batch_size=32, lr=3e-4, warmup_steps=2,
                                                  checkpoint_every=10),
        device="cpu", out=out))


@pytest.mark.slow
def test_monitored_tasks_are_measured_at_every_alpha_and_on_test(monitored_run: Path) -> None:
    run = load_run(monitored_run)
    manifest = run.manifest
    assert manifest.monitor_tasks == ["printed-digits"] and manifest.tasks["printed-digits"].role == "monitor"
    assert manifest.support_tasks == ["count-objects"] and manifest.alpha.tolerances == {"count-objects": 2.0}
    assert "count-objects 2" in manifest.alpha.rule and "printed-digits" not in manifest.alpha.rule
    tasks = {"digits", "count-objects", "printed-digits"}
    for point in manifest.alpha.curve:
        assert set(point.val_accuracy) == set(point.val_macro_f1) == set(point.val_worst_class_accuracy) == tasks
    for table in (manifest.test_accuracy, manifest.test_macro_f1, manifest.test_worst_class_accuracy):
        assert set(table) == {"zeroshot", "finetuned", "patched"} and all(set(row) == tasks for row in table.values())
    reference = manifest.alpha.zeroshot_val_accuracy
    chosen = next(p for p in manifest.alpha.curve if p.alpha == manifest.alpha.chosen)
    assert chosen.val_accuracy["count-objects"] >= reference["count-objects"] - 2.0


@pytest.mark.slow
def test_per_class_accuracy_is_written_and_agrees_with_the_manifest(monitored_run: Path) -> None:
    run = load_run(monitored_run)
    run.verified_file("per_class_accuracy.json")
    run.verified_file("wiseft.png")
    record = read_per_class(monitored_run)
    for task, figures in record.tasks.items():
        assert figures.labels == list(run.manifest.tasks[task].label_names)
        assert sum(figures.test_images) == run.manifest.tasks[task].sizes["test"]
        for kind, per_class in figures.test.items():
            correct = sum(a * n / 100 for a, n in zip(per_class, figures.test_images, strict=True) if a is not None)
            assert 100 * correct / sum(figures.test_images) == pytest.approx(run.manifest.test_accuracy[kind][task])
            worst = min(a for a in per_class if a is not None)
            assert worst == pytest.approx(run.manifest.test_worst_class_accuracy[kind][task])
        assert [point.alpha for point in figures.val] == [point.alpha for point in run.manifest.alpha.curve]


@pytest.mark.slow
def test_show_prints_every_task_with_its_metrics(monitored_run: Path) -> None:
    result = runner.invoke(app, ["show", str(monitored_run)])
    assert result.exit_code == 0, result.output
    for task, role in (("digits", "patch"), ("count-objects", "support"), ("printed-digits", "monitor")):
        rows = [line for line in result.output.splitlines() if line.startswith(f"│ {task} ")]
        assert len(rows) == 2 and all(role in row for row in rows)  # top-1 table and macro-F1 / worst-class table
    assert "macro-F1 / worst-class" in result.output


def test_a_manifest_written_before_these_fields_still_loads(tiny_run: Path, tmp_path: Path) -> None:
    data = json.loads((tiny_run / "manifest.json").read_text())
    for key in ("monitor_tasks", "test_macro_f1", "test_worst_class_accuracy"):
        data.pop(key, None)
    data["alpha"].pop("tolerances", None)
    for point in data["alpha"]["curve"]:
        point.pop("val_macro_f1", None)
        point.pop("val_worst_class_accuracy", None)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(tmp_path / "manifest.json")
    assert manifest.monitor_tasks == [] and manifest.test_macro_f1 == {} and manifest.alpha.tolerances == {}
    assert to_json(manifest)["test_accuracy"] == data["test_accuracy"]


@pytest.mark.parametrize(("args", "words"), [
    (["--support", "fashion-mnist", "--monitor", "fashion-mnist"], "monitored and also patched or supported"),
    (["--monitor", "digits"], "monitored and also patched or supported"),
    (["--support", "fashion-mnist:lots"], "is not a number of points"),
    (["--monitor", "nosuchtask"], "unknown task 'nosuchtask'"),
])
def test_bad_roles_and_tolerances_are_one_error_line(tmp_path: Path, args: list[str], words: str) -> None:
    result = runner.invoke(app, ["build", "--task", "digits", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert not (tmp_path / "run").exists()
