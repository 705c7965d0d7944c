"""`patcher build` and `patcher export` on a user's own datasets, as a new user runs them (issue 33, rows 1-2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_tasks_csv_shards import SHADES, write_csv, write_shard
from typer.testing import CliRunner

from patcher.cli import app
from patcher.runs.manifest import load_run

runner = CliRunner()
BASE = ["build", "--model", "patcher-tiny", "--pretrained", "none", "--steps", "2", "--batch-size", "8",
        "--alpha", "0.5", "--eval-batch-size", "16"]


def shapes(root: Path, parts: dict[str, int]) -> Path:
    """A folder dataset: <part>/<shape>/<n>.png, each image coloured by its shape."""
    for part, count in parts.items():
        for shape, shade in SHADES.items():
            (root / part / shape).mkdir(parents=True, exist_ok=True)
            for number in range(count):
                Image.new("RGB", (8, 8), (shade, number * 9, 0)).save(root / part / shape / f"{number}.png")
    return root


@pytest.mark.slow
def test_folder_build_uses_val_and_a_short_name_that_survives_a_move(tmp_path: Path) -> None:
    data = shapes(tmp_path / "data" / "shapes", {"train": 6, "val": 3, "test": 2})
    (data / "classnames.txt").write_text("square: a square\ncircle: a circle\ncross: a cross\n")
    out = tmp_path / "run"
    result = runner.invoke(app, [*BASE, "--task", f"folder:{data}", "--task-name", "toys", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"toys: alpha is chosen on its own val part (folder:{data})" in result.output
    manifest = load_run(out).manifest
    record = manifest.tasks["toys"]
    assert manifest.patch_tasks == ["toys"] and record.source == f"folder:{data}"
    assert record.sizes == {"train": 18, "val": 9, "test": 6}  # val/ is the held-out split, train/ stays whole
    assert record.classnames == ("a circle", "a cross", "a square")  # sorted folders, each with its own name

    moved = tmp_path / "elsewhere" / "shapes"
    shutil.move(str(data), moved)
    again = runner.invoke(app, [*BASE, "--task", f"folder:{moved}", "--out", str(tmp_path / "run2")])
    assert again.exit_code == 0, again.output
    assert load_run(tmp_path / "run2").manifest.patch_tasks == ["shapes"]  # named by the folder, not its path


@pytest.mark.slow
def test_export_names_tensors_by_the_short_name(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from patcher.stages.export import ExportOptions, export_run

    data = shapes(tmp_path / "data" / "shapes", {"train": 6, "test": 2})
    out = tmp_path / "run"
    assert runner.invoke(app, [*BASE, "--task", f"folder:{data}", "--out", str(out)]).exit_code == 0
    export = export_run(out, ExportOptions(out=tmp_path / "onnx", images_per_task=4, text=False))
    record = json.loads((Path(export) / "export.json").read_text())
    outputs = [tensor["name"] for tensor in record["tensors"]["outputs"]] if "tensors" in record else []
    assert "shapes" in record["tasks"]
    assert "logits_shapes" in json.dumps(record) and "data_shapes" not in json.dumps(outputs)


@pytest.mark.slow
def test_csv_and_shards_build(tmp_path: Path) -> None:
    write_csv(tmp_path / "table", "train", {"circle": 6, "cross": 6}, header="path,title")
    result = runner.invoke(app, [*BASE, "--task", f"csv:{tmp_path / 'table'}", "--csv-img-key", "path",
                                 "--csv-caption-key", "title", "--out", str(tmp_path / "r1")])
    assert result.exit_code == 0, result.output
    record = load_run(tmp_path / "r1").manifest.tasks["table"]
    assert record.classnames == ("circle", "cross") and "img_key=path" in (record.source or "")

    write_shard(tmp_path / "shards" / "train" / "000.tar", {"circle": 6, "square": 6})
    result = runner.invoke(app, [*BASE, "--task", f"wds:{tmp_path / 'shards'}", "--out", str(tmp_path / "r2")])
    assert result.exit_code == 0, result.output
    assert load_run(tmp_path / "r2").manifest.tasks["shards"].classnames == ("circle", "square")


@pytest.mark.parametrize(("arguments", "message"), [
    (["--task", "digits", "--task-name", "x"], "--task-name names one dataset of your own"),
    (["--task", "gtrsb"], "did you mean gtsrb"),
])
def test_bad_task_options_are_one_error_line(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = runner.invoke(app, [*BASE, *arguments, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "r").exists()
