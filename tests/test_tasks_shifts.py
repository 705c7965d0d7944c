"""ImageNet's distribution shifts and Food-101, each read from synthetic files in its real on-disk layout, and how
the subsets are scored: ImageNet-R/-A as ImageNet's logits restricted to their 200 classes, ObjectNet as the best
logit of the ImageNet classes mapped to each of its classes (WiSE-FT's `project_logits`).

The layouts are the published archives' (imagenetv2-matched-frequency-format-val/<index>/, imagenet-r/<wnid>/,
imagenet-a/<wnid>/, sketch/<wnid>/, objectnet-1.0/images/<folder>/, food-101/{images,meta}/), with one tiny image
per class coloured by its label, so decoded pixels can be checked against the label the loader gives.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patcher.base.errors import PatcherError
from patcher.data.tasks import get_task
from patcher.data.tasks.classnames import FOOD101_FOLDERS, imagenet
from patcher.data.tasks.imagenet_shifts import V2_FOLDER, imagenet_wnids, subset_columns
from patcher.data.tasks.objectnet_classes import OBJECTNET


def colour(label: int) -> tuple[int, int, int]:
    """A distinct colour per label (up to 1000 labels): label's base-10 digits spread over three channels."""
    return (label % 10 * 25, label // 10 % 10 * 25, label // 100 * 25)


def save(path: Path, label: int, size: tuple[int, int] = (8, 8), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(label)).save(path, format=fmt)


def labels_and_colours(data) -> list[tuple[int, tuple[int, int, int]]]:
    return [(label, image.convert("RGB").getpixel((0, 0))) for image, label in (data[i] for i in range(len(data)))]


def check_held_out(task_name: str, root: Path, total: int) -> None:
    """An evaluation set: no train split; val is a seeded 10% of its images, test the rest, disjoint."""
    task = get_task(task_name)
    val, test = task.dataset("val", data_root=root), task.dataset("test", data_root=root)
    assert len(val) == max(1, int(total * 0.1)) and len(val) + len(test) == total
    assert not set(val.indices.tolist()) & set(test.indices.tolist())
    with pytest.raises(PatcherError, match="has no split 'train'"):
        task.dataset("train", data_root=root)


# --- ImageNet-V2: folders named by class index, which sort as text ------------------------------------------


def test_imagenet_v2_labels_are_the_folder_numbers_not_their_text_order(tmp_path: Path) -> None:
    for index in range(1000):
        save(tmp_path / V2_FOLDER / str(index) / f"{index:04d}abc.jpeg", index, fmt="PNG")
    task = get_task("imagenet-v2")
    data = task.load("test", tmp_path, False)
    assert len(data) == 1000
    pairs = labels_and_colours(data)
    assert all(found == colour(label) for label, found in pairs)  # "10" sorts before "2"; labels still match pixels
    assert sorted(label for label, _ in pairs) == list(range(1000))
    assert task.classnames == imagenet()
    check_held_out("imagenet-v2", tmp_path, 1000)


def test_imagenet_v2_with_missing_class_folders_is_refused(tmp_path: Path) -> None:
    for index in range(10):
        save(tmp_path / V2_FOLDER / str(index) / "a.jpeg", index, fmt="PNG")
    with pytest.raises(PatcherError, match="expected 1000 named by class index"):
        get_task("imagenet-v2").load("test", tmp_path, False)


# --- ImageNet-R and -A: 200 wnid folders --------------------------------------------------------------------


@pytest.mark.parametrize("subset", ["r", "a"])
def test_imagenet_r_and_a_read_their_200_wnid_folders(tmp_path: Path, subset: str) -> None:
    wnids, columns = imagenet_wnids(), subset_columns(subset)
    for position, column in enumerate(columns):
        save(tmp_path / f"imagenet-{subset}" / wnids[column] / "x.jpg", position, fmt="JPEG", size=(16, 16))
    (tmp_path / f"imagenet-{subset}" / "README.txt").write_text("n01443537 goldfish\n")  # shipped beside the folders
    task = get_task(f"imagenet-{subset}")
    data = task.load("test", tmp_path, False)
    assert [label for label, _ in labels_and_colours(data)] == list(range(200))
    assert task.classnames == tuple(imagenet()[c] for c in columns)
    assert task.head_from is not None and task.head_from.parent == "imagenet" and task.head_from.columns == columns
    check_held_out(f"imagenet-{subset}", tmp_path, 200)


def test_imagenet_r_columns_are_wise_fts_class_sublist() -> None:
    # the first and last entries of WiSE-FT's CLASS_SUBLIST (src/datasets/imagenet_r.py and imagenet_a.py)
    assert subset_columns("r")[:8] == (1, 2, 4, 6, 8, 9, 11, 13) and subset_columns("r")[-3:] == (981, 983, 988)
    assert subset_columns("a")[:8] == (6, 11, 13, 15, 17, 22, 23, 27) and subset_columns("a")[-3:] == (986, 987, 988)
    assert len(imagenet_wnids()) == 1000 and imagenet_wnids()[0] == "n01440764"


def test_imagenet_r_with_other_folders_is_refused_naming_the_missing(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    for index in range(200):  # the first 200 ImageNet classes: the right count, the wrong classes
        save(tmp_path / "imagenet-r" / wnids[index] / "x.png", index)
    with pytest.raises(PatcherError, match=r"expected the 200 wnid folders.*missing"):
        get_task("imagenet-r").load("test", tmp_path, False)


# --- ImageNet-Sketch: sketch/<wnid>/ ------------------------------------------------------------------------


def test_imagenet_sketch_reads_sketch_wnid_folders(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    for index in range(1000):
        save(tmp_path / "sketch" / wnids[index] / "sketch_1.JPEG", index, fmt="PNG")
    data = get_task("imagenet-sketch").load("test", tmp_path, False)
    pairs = labels_and_colours(data)
    assert [label for label, _ in pairs] == list(range(1000))
    assert all(found == colour(label) for label, found in pairs)


# --- ObjectNet: images/<folder>/, 113 folders mapped to ImageNet, a 2-pixel border cut -----------------------


def write_objectnet(root: Path, folders: list[str]) -> None:
    for number, folder in enumerate(folders):
        image = Image.new("RGB", (12, 10), (255, 0, 0))  # a red frame ...
        image.paste(Image.new("RGB", (8, 6), colour(number)), (2, 2))  # ... around the object
        (root / "objectnet-1.0" / "images" / folder).mkdir(parents=True, exist_ok=True)
        image.save(root / "objectnet-1.0" / "images" / folder / "1a2b.png")


def test_objectnet_reads_the_113_mapped_folders_and_cuts_the_border(tmp_path: Path) -> None:
    folders = sorted(folder for folder, _, _ in OBJECTNET)
    write_objectnet(tmp_path, [*folders, "squeegee", "eyeglasses"])  # unmapped classes are left out
    task = get_task("objectnet")
    data = task.load("test", tmp_path, False)
    assert len(data) == 113
    for label in (0, 57, 112):
        image, found = data[label]
        assert found == label and image.size == (8, 6)
        assert set(image.getdata()) == {colour(label)}  # nothing of the red frame is left
    assert task.label_names[0] == "alarm clock" and len(task.label_names) == 113
    assert len(task.classnames) == 125 and task.classnames[:2] == ("analog clock", "digital clock")
    assert task.column_labels[:3] == (0, 0, 1)


def test_objectnet_lacking_mapped_folders_is_refused(tmp_path: Path) -> None:
    write_objectnet(tmp_path, ["alarm_clock", "backpack"])
    with pytest.raises(PatcherError, match="lacks 111 of the 113 class folders"):
        get_task("objectnet").load("test", tmp_path, False)


# --- Food-101: torchvision's layout -------------------------------------------------------------------------


def test_food101_reads_images_and_meta_json(tmp_path: Path) -> None:
    base = tmp_path / "food-101"
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for label, folder in enumerate(FOOD101_FOLDERS):
        for split, ids in (("train", ("11", "12")), ("test", ("21",))):
            for image_id in ids:
                save(base / "images" / folder / f"{image_id}.jpg", label, fmt="PNG")
            splits[split][folder] = [f"{folder}/{image_id}" for image_id in ids]
    (base / "meta").mkdir()
    for split, listing in splits.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(listing))
    task = get_task("food101")
    train, val, test = (task.dataset(split, data_root=tmp_path) for split in ("train", "val", "test"))
    assert (len(train) + len(val), len(val), len(test)) == (202, 20, 101)
    pairs = labels_and_colours(test)
    assert [label for label, _ in pairs] == list(range(101)) and all(found == colour(lab) for lab, found in pairs)
    assert task.classnames[16:18] == ("cheese plate", "cheesecake")  # torchvision sorts the folder names


# --- missing data: one line naming the layout and what to do ------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("imagenet-v2", "imagenetv2-matched-frequency-format-val"),
    ("imagenet-r", "imagenet-r"),
    ("imagenet-a", "imagenet-a"),
    ("imagenet-sketch", "sketch"),
    ("objectnet", "objectnet-1.0"),
    ("food101", "food-101"),
])
def test_missing_shift_sets_name_the_layout_and_where(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(PatcherError) as caught:
        get_task(name).dataset("test", data_root=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and f"{tmp_path / expected}" in message and "expected" in message
    fetchable = name in ("imagenet-v2", "imagenet-r", "imagenet-a", "food101")
    assert ("--download" in message) == fetchable and ("by hand" in message) == (not fetchable)


def test_an_evaluation_set_cannot_be_the_patch_task() -> None:
    from patcher.stages.build import BuildOptions, check_options

    with pytest.raises(PatcherError, match="imagenet-r is an evaluation set with no training images"):
        check_options(BuildOptions(task="imagenet-r"))


# --- scoring: restricted logits, and ObjectNet's best-of-its-columns ----------------------------------------


@pytest.fixture(scope="module")
def imagenet_scoring(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random CLIP, ImageNet's head with one template (1,000 prompts), a session over imagenet, imagenet-r
    and objectnet with their heads from `task_head`, and stores of synthetic ImageNet-R / ObjectNet images."""
    from methods_support import make_tiny_model

    from patcher.data.image_store import build_store
    from patcher.data.prepared_splits import Splits
    from patcher.data.transforms import Normalize
    from patcher.models import load_clip
    from patcher.patching.session import Session
    from patcher.stages.build import task_head

    root = tmp_path_factory.mktemp("shifts")
    model = make_tiny_model(root / "model", seed=3)
    loaded = load_clip(model, None)
    one = ("a photo of a {}.",)
    parent = dataclasses.replace(get_task("imagenet"), templates=one)
    tasks = {name: dataclasses.replace(get_task(name), templates=one) for name in ("imagenet-r", "objectnet")}
    heads = {"imagenet": task_head(loaded, parent, "cpu")}
    heads.update({name: task_head(loaded, task, "cpu", parent) for name, task in tasks.items()})
    rng = np.random.default_rng(0)
    wnids = imagenet_wnids()
    for column in subset_columns("r"):
        path = root / "data" / "imagenet-r" / wnids[column] / "x.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    write_objectnet(root / "data", sorted(folder for folder, _, _ in OBJECTNET))
    stores = {name: build_store(tasks[name].load("test", root / "data", False), loaded.preprocess_cfg, name, True)[0]
              for name in tasks}
    splits = Splits({}, {}, {}, Normalize(loaded.preprocess_cfg))
    session = Session(loaded, {"imagenet": parent, **tasks}, heads, splits)
    return session, heads, stores


def imagenet_logits(session, heads, store) -> torch.Tensor:
    classifier = session.classifier(session.zeroshot, ["imagenet"])
    pixels = session.splits.normalize(torch.from_numpy(store.read(np.arange(len(store)))))
    with torch.no_grad():
        return classifier(pixels, task="imagenet")["imagenet"]


def test_imagenet_r_scoring_equals_restricting_the_1000_class_logits(imagenet_scoring) -> None:
    session, heads, stores = imagenet_scoring
    columns = list(subset_columns("r"))
    assert torch.equal(heads["imagenet-r"], heads["imagenet"][:, columns])  # the head is ImageNet's columns
    restricted = imagenet_logits(session, heads, stores["imagenet-r"])[:, columns]
    classifier = session.classifier(session.zeroshot, ["imagenet-r"])
    pixels = session.splits.normalize(torch.from_numpy(stores["imagenet-r"].read(np.arange(200))))
    with torch.no_grad():
        own = classifier(pixels, task="imagenet-r")["imagenet-r"]
    torch.testing.assert_close(own, restricted, rtol=0, atol=1e-5)
    expected = restricted.argmax(dim=1).numpy()
    scores = session.scores(session.zeroshot, {"imagenet-r": stores["imagenet-r"]})["imagenet-r"]
    predicted = np.argmax(scores.confusion, axis=1)  # one image per class: each row's only count is its prediction
    assert scores.total == 200 and list(predicted) == list(expected)
    assert scores.accuracy == 100.0 * float((expected == np.arange(200)).mean())


def test_objectnet_scores_each_class_by_its_best_imagenet_logit(imagenet_scoring) -> None:
    session, heads, stores = imagenet_scoring
    logits = imagenet_logits(session, heads, stores["objectnet"]).numpy()
    # WiSE-FT's ObjectNetBase.project_logits: class k takes the max over its ImageNet classes
    projected = np.stack([logits[:, list(mapped)].max(axis=1) for _, _, mapped in OBJECTNET], axis=1)
    expected = projected.argmax(axis=1)
    scores = session.scores(session.zeroshot, {"objectnet": stores["objectnet"]})["objectnet"]
    assert scores.confusion.shape == (113, 113) and scores.total == 113
    assert list(np.argmax(scores.confusion, axis=1)) == list(expected)
