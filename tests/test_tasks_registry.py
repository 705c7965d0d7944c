"""The registry: names, published class names and templates, split names, data root resolution."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from patcher.base.errors import PatcherError
from patcher.data.tasks import PAINT_TASKS, Task, default_data_root, get_task, known_tasks
from patcher.data.tasks.missing import first_line, missing_data_error

EXPECTED_TASKS = {
    *("cars", "dtd", "eurosat", "gtsrb", "kitti", "mnist", "resisc45", "sun397", "svhn"),
    *("imagenet", "cifar10", "cifar100", "stl10", "fashion-mnist", "digits", "printed-digits"),
    *("imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch", "objectnet", "food101", "typographic-digits"),
    *("printed-letters", "dot-matrix-letters", "seven-segment-digits", "house-numbers", "filled-shapes"),
    *("outlined-shapes", "textures", "colored-textures", "dice", "count-objects", "fashion-sketch"),
}
EVALUATION_SETS = {"imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch", "objectnet"}
CLASS_COUNTS = {
    "cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "kitti": 4, "mnist": 10, "resisc45": 45,
    "sun397": 397, "svhn": 10, "imagenet": 1000, "cifar10": 10, "cifar100": 100, "stl10": 10,
    "fashion-mnist": 10, "digits": 10, "printed-digits": 10, "imagenet-v2": 1000, "imagenet-r": 200,
    "imagenet-a": 200, "imagenet-sketch": 1000, "objectnet": 113, "food101": 101, "typographic-digits": 10,
    "printed-letters": 26, "dot-matrix-letters": 26, "seven-segment-digits": 10, "house-numbers": 10,
    "filled-shapes": 8, "outlined-shapes": 8, "textures": 8, "colored-textures": 8, "dice": 6, "count-objects": 6,
    "fashion-sketch": 10,
}  # fmt: skip


def test_known_tasks_are_the_registered_ones() -> None:
    assert set(known_tasks()) == EXPECTED_TASKS
    assert set(PAINT_TASKS) <= EXPECTED_TASKS and len(PAINT_TASKS) == 9


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_every_task_has_classnames_and_one_slot_templates(name: str) -> None:
    task = get_task(name)
    assert task.name == name
    assert len(task.label_names) == CLASS_COUNTS[name]
    duplicates = {c for c in task.label_names if task.label_names.count(c) > 1}
    # OpenAI's published ImageNet names repeat two (two missile classes, two sunglasses classes).
    thousand = name in ("imagenet", "imagenet-v2", "imagenet-sketch")
    assert duplicates == ({"missile", "sunglasses"} if thousand else set())
    assert all(isinstance(c, str) and c.strip() == c and c for c in (*task.classnames, *task.label_names))
    assert task.templates and all(t.count("{}") == 1 for t in task.templates)
    assert all(t.format("x") == t.replace("{}", "x") for t in task.templates)
    if name in EVALUATION_SETS:
        assert task.splits == ("val", "test") and not task.trainable
    else:
        assert task.splits[:3] == ("train", "val", "test") and task.trainable


def test_gtsrb_uses_clips_descriptive_names_and_three_templates() -> None:
    task = get_task("gtsrb")
    assert len(task.classnames) == 43 and len(task.templates) == 3
    assert task.classnames[0] == "red and white circle 20 kph speed limit"
    assert task.classnames[14] == "stop"
    assert task.templates[0] == 'a zoomed in photo of a "{}" traffic sign.'


def test_imagenet_reuses_open_clips_metadata() -> None:
    from patcher.base.compat import import_torchvision

    import_torchvision()
    from open_clip import zero_shot_metadata

    task = get_task("imagenet")
    assert task.classnames == tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert len(task.templates) == 80
    assert task.templates[0] == zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES[0]("{}")


def test_class_orders_follow_the_loaders_labels() -> None:
    assert get_task("eurosat").classnames[0] == "annual crop land"  # folder AnnualCrop sorts first
    assert get_task("eurosat").classnames[-1] == "lake or sea"  # SeaLake last
    assert get_task("kitti").classnames[-1] == "a photo i took with no car."
    assert get_task("kitti").templates == ("{}",)
    assert get_task("mnist").templates == ('a photo of the number: "{}".',)
    assert get_task("cifar100").classnames[1] == "aquarium fish"
    assert get_task("fashion-mnist").classnames[0] == "T-shirt/top"
    assert get_task("digits").classnames == tuple("0123456789")


def test_digits_exposes_its_pretrain_split() -> None:
    assert get_task("digits").splits == ("train", "val", "test", "pretrain")
    assert "pretrain" not in get_task("mnist").splits


def test_names_are_normalised() -> None:
    assert get_task("GTSRB").name == "gtsrb"
    assert get_task("fashion_mnist").name == "fashion-mnist"


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(PatcherError) as raised:
        get_task("nope")
    message = str(raised.value)
    assert "nope" in message and "gtsrb" in message and "folder:DIR" in message and "wds:DIR" in message
    assert "\n" not in message


def test_unknown_split_is_a_patcher_error(tmp_path: Path) -> None:
    with pytest.raises(PatcherError, match="pretrain"):
        get_task("mnist").dataset("pretrain", data_root=tmp_path)


def test_task_rejects_bad_templates() -> None:
    def load(part, root, download):
        raise AssertionError

    with pytest.raises(PatcherError, match="exactly one"):
        Task("t", ("a",), ("no slot",), load)
    with pytest.raises(PatcherError, match="exactly one"):
        Task("t", ("a",), ("{} and {}",), load)
    with pytest.raises(PatcherError, match="class names"):
        Task("t", (), ("{}",), load)


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PATCHER_DATA", raising=False)
    assert default_data_root() == Path.home() / ".cache" / "patcher" / "data"
    monkeypatch.setenv("PATCHER_DATA", str(tmp_path))
    assert default_data_root() == tmp_path


def test_data_root_comes_from_the_environment_when_not_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATCHER_DATA", str(tmp_path))
    with pytest.raises(PatcherError, match=re.escape(str(tmp_path / "MNIST" / "raw"))):
        get_task("mnist").dataset("test")


def test_download_failure_is_named_in_one_line() -> None:
    problem = "download failed: " + first_line(OSError("no route\nto host"))
    error = missing_data_error("SVHN", Path("/x/svhn"), "train_32x32.mat", problem=problem)
    assert str(error) == (
        "SVHN not found under /x/svhn: expected train_32x32.mat; download failed: OSError: no route; "
        "pass --download on a connected machine or --data-dir DIR"
    )


def test_importing_the_registry_touches_neither_torchvision_nor_disk() -> None:
    code = (
        "import sys; from patcher.data.tasks import get_task; t = get_task('gtsrb'); get_task('digits'); "
        "print('torchvision' in sys.modules, 'open_clip' in sys.modules, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
