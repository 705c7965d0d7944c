"""Bad files in a `folder:` dataset: named up front, one error line, exit 2, nothing written; or skipped and counted."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from faults_support import run_patcher
from PIL import Image

from patcher.base.errors import PatcherError
from patcher.data.tasks import get_task
from patcher.data.tasks.checks import SkipReport, find_bad_images, image_problem

BUILD = [sys.executable, "-m", "patcher", "build", "--model", "patcher-tiny", "--pretrained", "none", "--steps", "2",
         "--batch-size", "8", "--device", "cpu", "--workers", "0"]


def picture(seed: int, size: tuple[int, int] = (12, 12)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def encoded(fmt: str, seed: int = 0, size: tuple[int, int] = (12, 12)) -> bytes:
    buffer = io.BytesIO()
    picture(seed, size).save(buffer, format=fmt)
    return buffer.getvalue()


def dataset(root: Path, per_class: int = 6) -> Path:
    for number, name in enumerate(("cat", "dog")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            picture(10 * number + index).save(folder / f"{index}.png")
    return root


def plant(root: Path, kind: str) -> Path:
    """One bad file of the given kind in train/dog; returns its path."""
    folder = root / "train" / "dog"
    if kind == "truncated-png":
        path = folder / "bad.png"
        path.write_bytes(encoded("PNG")[:-40])
    elif kind == "truncated-jpeg":
        path = folder / "bad.jpg"
        path.write_bytes(encoded("JPEG", size=(64, 64))[:-200])
    elif kind == "text-named-png":
        path = folder / "bad.png"
        path.write_text("not an image at all\n")
    elif kind == "symlink-to-text":
        (root / "notes.txt").write_text("hello\n")
        path = folder / "bad.png"
        path.symlink_to(root / "notes.txt")
    elif kind == "broken-symlink":
        path = folder / "bad.png"
        path.symlink_to(root / "nowhere.png")
    elif kind == "empty-file":
        path = folder / "bad.png"
        path.write_bytes(b"")
    elif kind == "elongated":
        path = folder / "bad.png"
        picture(0, (2, 4000)).save(path)
    else:
        raise AssertionError(kind)
    return path


KINDS = ["truncated-png", "truncated-jpeg", "text-named-png", "symlink-to-text", "broken-symlink", "empty-file",
         "elongated"]
REASONS = {"truncated-png": "truncated", "truncated-jpeg": "damaged", "text-named-png": "not an image",
           "symlink-to-text": "not an image", "broken-symlink": "broken symlink", "empty-file": "empty",
           "elongated": "too elongated"}


def test_the_planted_faults_are_real(tmp_path: Path) -> None:
    root = dataset(tmp_path / "d")
    for kind in ("truncated-png", "truncated-jpeg", "text-named-png"):
        path = plant(root, kind)
        with pytest.raises(Exception), Image.open(path) as image:  # noqa: B017 - PIL raises several types
            image.convert("RGB")
        path.unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_file_is_named_before_any_work(tmp_path: Path, kind: str) -> None:
    root = dataset(tmp_path / "d")
    bad = plant(root, kind)
    task = get_task(f"folder:{root}")
    with pytest.raises(PatcherError) as caught:
        task.dataset("train")
    message = str(caught.value)
    assert str(bad) in message and REASONS[kind] in message and "--skip-bad-images" in message
    assert "1 of 13 image files" in message


def test_good_files_pass_and_are_not_decoded_twice(tmp_path: Path) -> None:
    root = dataset(tmp_path / "d")
    picture(3, (40, 30)).save(root / "train" / "cat" / "big.jpg", quality=90)
    paths = [str(p) for p in sorted((root / "train").rglob("*.*"))]
    assert find_bad_images(paths) == []
    assert all(image_problem(path) is None for path in paths)


def test_an_empty_class_folder_is_refused(tmp_path: Path) -> None:
    root = dataset(tmp_path / "d")
    (root / "train" / "zebra").mkdir()
    with pytest.raises(PatcherError, match=r"class folder .*zebra has no images"):
        get_task(f"folder:{root}").dataset("train")


def test_skipping_leaves_bad_files_out_and_counts_them(tmp_path: Path) -> None:
    root = dataset(tmp_path / "d")
    bad = [plant(root, "truncated-png"), plant(root, "truncated-jpeg")]
    report = SkipReport()
    train = get_task(f"folder:{root}").part("train", root, bad_images=report)
    assert report.count == 2
    assert sorted(path for path, _ in report.skipped[str(root / "train")]) == sorted(map(str, bad))
    assert len(train) == 10  # 12 good images, 4:1 split without test/: 10 train (val is carved later)


def test_skipping_that_empties_a_class_is_refused(tmp_path: Path) -> None:
    root = dataset(tmp_path / "d", per_class=2)
    for path in (root / "train" / "dog").iterdir():
        path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(PatcherError, match="dog has no usable images"):
        get_task(f"folder:{root}").dataset("train", bad_images=SkipReport())


def test_the_cli_says_one_line_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    root = dataset(tmp_path / "d")
    bad = plant(root, "symlink-to-text")
    runs = tmp_path / "runs"
    runs.mkdir()
    result = run_patcher(*BUILD[3:], "--task", f"folder:{root}", "--out", str(runs / "r"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], result.stderr
    assert list(runs.iterdir()) == []

    from typer.testing import CliRunner

    from patcher.cli import app

    result = CliRunner().invoke(app, [*BUILD[3:], "--task", f"folder:{root}", "--out", str(runs / "r"),
                                      "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert "left out 1 unusable image files" in " ".join(result.output.split())
    assert sorted(p.name for p in runs.iterdir()) == ["r"]
    data = json.loads((runs / "r" / "manifest.json").read_text())["training"]["data"]
    assert data["skip_bad_images"] is True
    assert [path for path, _ in data["skipped_bad_images"][str(root / "train")]] == [str(bad)]


def test_the_check_cache_keeps_only_the_most_recent_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived process checking dataset after dataset holds at most CACHED_FILES results."""
    from patcher.data.tasks import checks

    monkeypatch.setattr(checks, "CACHED_FILES", 3)
    monkeypatch.setattr(checks, "_cache", type(checks._cache)())
    paths = []
    for number in range(5):
        path = tmp_path / f"{number}.png"
        Image.new("RGB", (4, 4)).save(path)
        paths.append(str(path))
    path.write_bytes(b"not an image")
    assert [p for p, _ in find_bad_images(paths)] == [paths[-1]]
    assert list(checks._cache) == paths[2:]
    assert [p for p, _ in find_bad_images(paths[-1:])] == [paths[-1]]  # still refused, from the cache
