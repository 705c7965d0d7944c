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
    assert task.name == "pets" and task.source == f"folder:{path}"  # named by its folder, found by its path
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
    (path / "classnames.txt").write_text("n02: sports car\n\nn01: tabby cat\n")  # any order: each line names its folder
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


@pytest.mark.parametrize(("lines", "message"), [
    ("circle\ncross\n", r"line 1 \('circle'\) is not `LABEL: NAME`"),  # a bare list could pair wrongly: refused
    ("a: circle\n", r"names no class folder b: give one `LABEL: NAME` line for each of a, b"),
    ("a: circle\nb: cross\nc: square\n", r"names class folders the data lacks: c"),
    ("a: circle\nb: circle\n", r"gives the name circle to several class folders"),
    ("a: circle\na: cross\n", r"names class folder 'a' twice"),
])
def test_classnames_file_must_map_every_folder_once(tmp_path: Path, lines: str, message: str) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 1, "b": 1}})
    (path / "classnames.txt").write_text(lines)
    with pytest.raises(PatcherError, match=message) as raised:
        get_task(f"folder:{path}")
    assert "\n" not in str(raised.value)


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


def test_a_mapped_name_follows_its_folder_into_the_labels(tmp_path: Path) -> None:
    """The issue's mislabelling: names listed in another order than the folders. Each image's label now names the
    class of its own folder, whatever order the map is written in."""
    layout = {"circle": 2, "cross": 2, "square": 2}
    path = make_folder(tmp_path / "shapes", {"train": layout, "test": layout})
    (path / "classnames.txt").write_text("square: a square\ncircle: a circle\ncross: a cross\n")
    task = get_task(f"folder:{path}")
    data = task.dataset("test")
    for index in range(len(data)):
        folder = Path(data.base.samples[index][0]).parent.name
        assert task.classnames[data[index][1]] == f"a {folder}"


def test_val_folder_is_the_held_out_split(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 8, "b": 8}, "val": {"a": 3, "b": 2}, "test": {"a": 1}})
    task = get_task(f"folder:{path}")
    assert "val" in task.parts and task.splits == ("train", "val", "test")
    assert (len(task.dataset("train")), len(task.dataset("val")), len(task.dataset("test"))) == (16, 5, 1)
    assert sorted(label for _, label in task.dataset("val")) == [0, 0, 0, 1, 1]


def test_val_folder_without_test(tmp_path: Path) -> None:
    path = make_folder(tmp_path / "d", {"train": {"a": 10, "b": 10}, "val": {"a": 2, "b": 2}})
    task = get_task(f"folder:{path}")
    assert (len(task.dataset("train")), len(task.dataset("val")), len(task.dataset("test"))) == (16, 4, 4)


@pytest.mark.parametrize(("spec", "name"), [("folder:{p}", "my_data"), ("shapes=folder:{p}", "shapes")])
def test_task_name_default_and_given(tmp_path: Path, spec: str, name: str) -> None:
    path = make_folder(tmp_path / "my data!", {"train": {"a": 1}})
    assert get_task(spec.format(p=path)).name == name
    assert get_task(f"folder:{path}", "other").name == "other"


@pytest.mark.parametrize(("folder", "given", "message"), [
    ("digits", None, "is a built-in task's: name the task with --task-name"),
    ("123", None, "not usable in model names"),
    ("ok", "x y", "not usable in model and tensor names"),
    ("ok", "gtsrb", "is a built-in task's"),
    ("Fashion_MNIST", None, "is a built-in task's"),
])
def test_unusable_task_names_are_refused(tmp_path: Path, folder: str, given: str | None, message: str) -> None:
    path = make_folder(tmp_path / folder, {"train": {"a": 1}})
    with pytest.raises(PatcherError, match=message):
        get_task(f"folder:{path}", given)


def test_a_moved_dataset_keeps_its_task_name(tmp_path: Path) -> None:
    first = make_folder(tmp_path / "a" / "shapes", {"train": {"x": 1}})
    second = make_folder(tmp_path / "b" / "c" / "shapes", {"train": {"x": 1}})
    assert get_task(f"folder:{first}").name == get_task(f"folder:{second}").name == "shapes"
