"""User datasets in ImageFolder layout: "folder:PATH"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from patcher.base.errors import PatcherError
from patcher.data.tasks import get_task


def make_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """Write {split: {class folder: number of images}} as tiny PNGs, each coloured by its class folder."""
    for split, classes in layout.items():
        for shade, (folder, count) in enumerate(sorted(classes.items())):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for number in range(count):
                Image.new("RGB", (5, 5), (shade * 40, 0, 0)).save(root / split / folder / f"{number}.png")
    return root


def test_folder_with_train_and_test(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "pets", {"train": {"golden_retriever": 10, "cat": 10}, "test": {"cat": 3}})
    task = get_task(f"folder:{path}")
    assert task.name == f"folder:{path}"
    assert task.classnames == ("cat", "golden retriever")  # sorted folders, underscores read as spaces
    assert task.templates == ("a photo of a {}.",)
    train, val, test = (task.dataset(split) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 3)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert [label for _, label in test] == [0, 0, 0]  # test/ lacks a class: labels still follow train/
    image, label = train[len(train) - 1]
    assert image.mode == "RGB" and label == 1


def test_folder_test_classes_are_numbered_by_train_classes(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"c": 1, "b": 1}})
    assert [label for _, label in get_task(f"folder:{path}").dataset("test")] == [1, 2]


def test_folder_reads_classnames_and_templates_files(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"n01": 2, "n02": 2}})
    (path / "classnames.txt").write_text("tabby cat\n\nsports car\n")
    (path / "templates.txt").write_text("a photo of a {}.\nitap of a {}.\n")
    task = get_task(f"folder:{path}")
    assert task.classnames == ("tabby cat", "sports car")
    assert task.templates == ("a photo of a {}.", "itap of a {}.")


def test_folder_without_test_is_split_deterministically(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 10, "b": 15}})
    task = get_task(f"folder:{path}")
    parts = {split: task.load(split, path, False) for split in ("train", "test")}
    assert (len(parts["train"]), len(parts["test"])) == (20, 5)
    assert not set(parts["train"].indices.tolist()) & set(parts["test"].indices.tolist())
    again = get_task(f"folder:{path}").load("test", path, False)
    assert again.indices.tolist() == parts["test"].indices.tolist()
    assert sorted(label for _, label in parts["test"]) == [0, 0, 1, 1, 1]  # stratified
    assert len(task.dataset("train")) + len(task.dataset("val")) == 20


def test_classnames_file_must_match_the_folders(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 1, "b": 1}})
    (path / "classnames.txt").write_text("only one\n")
    with pytest.raises(PatcherError, match=r"has 1 names but .* has 2 class folders"):
        get_task(f"folder:{path}")


def test_templates_file_needs_one_slot_per_line(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 1}})
    (path / "templates.txt").write_text("a photo of a {}.\na photo.\n")
    with pytest.raises(PatcherError, match="exactly one"):
        get_task(f"folder:{path}")


def test_empty_folder_dataset_is_a_patcher_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatcherError, match="no train/ folder"):
        get_task(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(PatcherError, match="no class folders"):
        get_task(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "empty" / "train" / "cat").mkdir()
    task = get_task(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(PatcherError, match="no images in train/"):
        task.dataset("train")


def test_missing_folder_is_a_patcher_error(tmp_path: Path) -> None:
    with pytest.raises(PatcherError, match=re.escape(str(tmp_path / "nowhere"))):
        get_task(f"folder:{tmp_path / 'nowhere'}")


def test_unknown_test_classes_are_refused(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 1}, "test": {"a": 1, "zebra": 1}})
    with pytest.raises(PatcherError, match="zebra"):
        get_task(f"folder:{path}").dataset("test")
