"""Each loader on a small synthetic copy of its dataset's real on-disk layout, written into tmp_path.

The real datasets cannot be downloaded here. The files below have the real names, places and formats
(IDX, pickled CIFAR batches, STL-10 binaries, SVHN .mat, PPM plus CSV for GTSRB, ...), with a few tiny
images per class. CIFAR, STL-10 and SVHN check the MD5 of the real archives' files, which synthetic files
cannot match: for those the test uses a subclass of the torchvision class whose only change is that
its file lists carry no checksum (torchvision's check then tests that the files exist), and everything
else, reading and decoding included, is torchvision's own code.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.io
from PIL import Image

from patcher.base.compat import import_torchvision
from patcher.base.errors import PatcherError
from patcher.data.tasks import Task, get_task, loaders
from patcher.data.tasks.classnames import EUROSAT_FOLDERS, RESISC45_FOLDERS, SUN397
from patcher.data.tasks.kitti import closest_vehicle_class
from patcher.data.tasks.views import ImageView

datasets = import_torchvision().datasets


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 with its file lists' MD5s removed: files are checked for existence only."""

    train_list: ClassVar = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list: ClassVar = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta: ClassVar = {**datasets.CIFAR10.meta, "md5": None}


class UncheckedCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR100 with its file lists' MD5s removed."""

    train_list: ClassVar = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list: ClassVar = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta: ClassVar = {**datasets.CIFAR100.meta, "md5": None}


class UncheckedSTL10(datasets.STL10):
    """torchvision's STL10 with its file lists' MD5s removed."""

    train_list: ClassVar = [[name, None] for name, _ in datasets.STL10.train_list]
    test_list: ClassVar = [[name, None] for name, _ in datasets.STL10.test_list]


class UncheckedSVHN(datasets.SVHN):
    """torchvision's SVHN with its file lists' MD5s removed."""

    split_list: ClassVar = {split: [url, name, None] for split, (url, name, _) in datasets.SVHN.split_list.items()}


def with_dataset_class(name: str, dataset_class: type) -> Task:
    """The registered task, loading through `dataset_class` instead of torchvision's own class."""
    task = get_task(name)
    return dataclasses.replace(task, load=partial(task.load, dataset_class=dataset_class))


def colour(label: int) -> tuple[int, int, int]:
    """A distinct solid colour per label, so decoded pixels can be checked against the label."""
    return (label * 5 % 256, 255 - label * 5 % 256, 128)


def save_image(path: Path, label: int, size: tuple[int, int] = (6, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(label)).save(path)


def check_items(data, num_classes: int, size: int | None = None) -> list[int]:
    """Every item is (RGB PIL image, int label in range); returns the labels."""
    if size is not None:
        assert len(data) == size
    labels = []
    for index in range(len(data)):
        image, label = data[index]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert type(label) is int and 0 <= label < num_classes
        labels.append(label)
    return labels


def check_splits(task: Task, root: Path, train_total: int, test_total: int) -> None:
    """train + val = the train part (val a 10% holdout), test is the test part, all items well formed."""
    train, val, test = (task.dataset(split, data_root=root) for split in ("train", "val", "test"))
    val_size = max(1, int(train_total * 0.1))
    assert (len(train), len(val), len(test)) == (train_total - val_size, val_size, test_total)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    for data in (train, val, test):
        check_items(data, len(task.classnames))


# --- IDX (MNIST) -------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: magic (0x08 = unsigned byte, then the number of dimensions), sizes, raw data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    for prefix, count in (("train", 20), ("t10k", 10)):
        labels = np.arange(count) % 10
        images = np.zeros((count, 28, 28), np.uint8) + (labels * 20)[:, None, None].astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    task = get_task("mnist")
    check_splits(task, tmp_path, train_total=20, test_total=10)
    image, label = task.dataset("test", data_root=tmp_path)[3]
    assert label == 3 and image.size == (28, 28) and image.getpixel((0, 0)) == (60, 60, 60)


# --- CIFAR (pickled batches) -------------------------------------------------------------------------


def cifar_rows(labels: list[int]) -> np.ndarray:
    """CIFAR rows: 1024 red, 1024 green, 1024 blue bytes per image."""
    return np.stack([np.repeat(np.array(colour(label), np.uint8), 1024) for label in labels])


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_cifar10_reads_pickled_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for batch in range(1, 6):
        labels = [(batch + i) % 10 for i in range(4)]
        write_pickle(folder / f"data_batch_{batch}", {"data": cifar_rows(labels), "labels": labels})
    write_pickle(folder / "test_batch", {"data": cifar_rows(list(range(10))), "labels": list(range(10))})
    write_pickle(folder / "batches.meta", {"label_names": list(get_task("cifar10").classnames)})
    task = with_dataset_class("cifar10", UncheckedCIFAR10)
    check_splits(task, tmp_path, train_total=20, test_total=10)
    image, label = task.dataset("test", data_root=tmp_path)[7]
    assert label == 7 and image.size == (32, 32) and image.getpixel((5, 5)) == colour(7)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train_labels = list(range(0, 100, 4))
    write_pickle(folder / "train", {"data": cifar_rows(train_labels), "fine_labels": train_labels})
    write_pickle(folder / "test", {"data": cifar_rows([99, 42]), "fine_labels": [99, 42]})
    names = [name.replace(" ", "_") for name in get_task("cifar100").classnames]
    write_pickle(folder / "meta", {"fine_label_names": names})
    task = with_dataset_class("cifar100", UncheckedCIFAR100)
    check_splits(task, tmp_path, train_total=25, test_total=2)
    assert [label for _, label in task.dataset("test", data_root=tmp_path)] == [99, 42]


# --- STL-10 (binary) ---------------------------------------------------------------------------------


def write_stl_images(path: Path, labels: list[int]) -> None:
    """STL-10 images: uint8 [N, 3, 96, 96], each channel stored column-major (torchvision transposes)."""
    pixels = np.stack([np.array(colour(label), np.uint8)[:, None, None] * np.ones((3, 96, 96), np.uint8)
                       for label in labels])  # fmt: skip
    path.write_bytes(np.ascontiguousarray(pixels.transpose(0, 1, 3, 2)).tobytes())


def test_stl10_reads_binary_files(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train, test = [i % 10 for i in range(12)], [9, 0, 5]
    write_stl_images(folder / "train_X.bin", train)
    (folder / "train_y.bin").write_bytes(bytes(label + 1 for label in train))  # 1-based on disk
    write_stl_images(folder / "test_X.bin", test)
    (folder / "test_y.bin").write_bytes(bytes(label + 1 for label in test))
    (folder / "unlabeled_X.bin").write_bytes(b"")
    task = with_dataset_class("stl10", UncheckedSTL10)
    check_splits(task, tmp_path, train_total=12, test_total=3)
    images = task.dataset("test", data_root=tmp_path)
    assert [label for _, label in images] == test
    assert images[0][0].size == (96, 96) and images[0][0].getpixel((10, 3)) == colour(9)


# --- SVHN (.mat) -------------------------------------------------------------------------------------


def write_svhn(path: Path, digits: list[int]) -> None:
    """SVHN's .mat: X uint8 [32, 32, 3, N], y [N, 1] with digit 0 stored as 10."""
    x = np.stack([np.ones((32, 32, 3), np.uint8) * np.array(colour(d), np.uint8) for d in digits], axis=-1)
    y = np.array([[d if d else 10] for d in digits], np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": x, "y": y})


def test_svhn_reads_mat_files_and_maps_10_to_0(tmp_path: Path) -> None:
    write_svhn(tmp_path / "svhn" / "train_32x32.mat", [i % 10 for i in range(15)])
    write_svhn(tmp_path / "svhn" / "test_32x32.mat", [0, 1, 9])
    task = with_dataset_class("svhn", UncheckedSVHN)
    check_splits(task, tmp_path, train_total=15, test_total=3)
    test = task.dataset("test", data_root=tmp_path)
    assert [label for _, label in test] == [0, 1, 9]
    assert test[2][0].getpixel((1, 1)) == colour(9)


# --- GTSRB (PPM + CSV) -------------------------------------------------------------------------------


def test_gtsrb_reads_ppm_folders_and_the_test_csv(tmp_path: Path) -> None:
    base = tmp_path / "gtsrb"
    for cls in range(43):
        folder = base / "GTSRB" / "Training" / f"{cls:05d}"
        for track in range(2):
            save_image(folder / f"00000_{track:05d}.ppm", cls)
        (folder / f"GT-{cls:05d}.csv").write_text(
            "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
            + "".join(f"00000_{t:05d}.ppm;6;6;0;0;5;5;{cls}\n" for t in range(2))
        )
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for index, cls in enumerate([42, 0, 14]):
        save_image(base / "GTSRB" / "Final_Test" / "Images" / f"{index:05d}.ppm", cls)
        rows.append(f"{index:05d}.ppm;6;6;0;0;5;5;{cls}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    task = get_task("gtsrb")
    check_splits(task, tmp_path, train_total=86, test_total=3)
    test = task.dataset("test", data_root=tmp_path)
    assert [label for _, label in test] == [42, 0, 14]
    assert test[0][0].getpixel((0, 0)) == colour(42)
    assert sorted(set(check_items(task.load("train", tmp_path, False), 43))) == list(range(43))


# --- DTD ---------------------------------------------------------------------------------------------


def test_dtd_train_part_is_its_train_and_val_lists(tmp_path: Path) -> None:
    data = tmp_path / "dtd" / "dtd"
    classes = get_task("dtd").classnames
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for cls in classes:
        for number, split in enumerate(lists, start=1):
            name = f"{cls}/{cls}_{number:04d}.jpg"
            save_image(data / "images" / name, classes.index(cls))
            lists[split].append(name)
    for split, names in lists.items():
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("\n".join(names) + "\n")
    task = get_task("dtd")
    check_splits(task, tmp_path, train_total=94, test_total=47)
    assert check_items(task.dataset("test", data_root=tmp_path), 47) == list(range(47))


# --- EuroSAT -----------------------------------------------------------------------------------------


def test_eurosat_is_split_nine_to_one_per_class(tmp_path: Path) -> None:
    for label, folder in enumerate(EUROSAT_FOLDERS):
        for number in range(1, 11):
            save_image(tmp_path / "eurosat" / "2750" / folder / f"{folder}_{number}.jpg", label)
    task = get_task("eurosat")
    check_splits(task, tmp_path, train_total=90, test_total=10)
    assert sorted(check_items(task.dataset("test", data_root=tmp_path), 10)) == list(range(10))
    train_part, test_part = task.load("train", tmp_path, False), task.load("test", tmp_path, False)
    assert not set(train_part.indices.tolist()) & set(test_part.indices.tolist())


def test_eurosat_with_other_class_folders_is_refused(tmp_path: Path) -> None:
    save_image(tmp_path / "eurosat" / "2750" / "Clouds" / "Clouds_1.jpg", 0)
    with pytest.raises(PatcherError, match="expected the 10"):
        get_task("eurosat").dataset("test", data_root=tmp_path)


# --- SUN397 ------------------------------------------------------------------------------------------


def test_sun397_reads_classname_txt_and_nested_class_folders(tmp_path: Path) -> None:
    base = tmp_path / "SUN397"
    # Class paths as in ClassName.txt: "/<letter>/<name>[/<sub>]"; two-level names exercise the nesting.
    paths = [f"/{name[0]}/{name.replace(' ', '_')}" for name in SUN397]
    paths[8] = "/a/apartment_building/outdoor"
    base.mkdir()
    (base / "ClassName.txt").write_text("\n".join(paths) + "\n")
    for label, path in enumerate(paths):
        for number in range(2):
            save_image(base / path.lstrip("/") / f"sun_{label:03d}{number}.jpg", label % 50)
    task = get_task("sun397")
    check_splits(task, tmp_path, train_total=636, test_total=158)
    labels = check_items(task.dataset("test", data_root=tmp_path), 397)
    assert len(set(labels)) > 100  # stratified: the test part spreads over the classes


# --- Stanford Cars (.mat annotations) ----------------------------------------------------------------


def write_annotations(path: Path, classes: list[int]) -> None:
    """cars_*_annos.mat: a struct array with bbox_x1..y2, class (1-based) and fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.array(
        [(0, 0, 5, 5, cls, f"{i + 1:05d}.jpg") for i, cls in enumerate(classes)],
        dtype=[(field, object) for field in fields],
    )
    scipy.io.savemat(path, {"annotations": records})


def test_stanford_cars_reads_devkit_annotations(tmp_path: Path) -> None:
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(get_task("cars").classnames, dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    train_classes, test_classes = [1 + (i * 17) % 196 for i in range(12)], [196, 1, 100]
    write_annotations(base / "devkit" / "cars_train_annos.mat", train_classes)
    write_annotations(base / "cars_test_annos_withlabels.mat", test_classes)
    for i, cls in enumerate(train_classes):
        save_image(base / "cars_train" / f"{i + 1:05d}.jpg", cls - 1)
    for i, cls in enumerate(test_classes):
        save_image(base / "cars_test" / f"{i + 1:05d}.jpg", cls - 1)
    task = get_task("cars")
    check_splits(task, tmp_path, train_total=12, test_total=3)
    assert [label for _, label in task.dataset("test", data_root=tmp_path)] == [195, 0, 99]


def test_stanford_cars_cannot_be_downloaded(tmp_path: Path) -> None:
    with pytest.raises(PatcherError) as raised:
        get_task("cars").dataset("train", data_root=tmp_path, download=True)
    assert str(tmp_path / "stanford_cars") in str(raised.value)
    assert "cannot be downloaded automatically" in str(raised.value)


# --- KITTI (closest vehicle distance) ----------------------------------------------------------------


def kitti_line(kind: str, z: float) -> str:
    """A KITTI label line: type truncated occluded alpha bbox(4) dimensions(3) location(3) rotation_y."""
    return f"{kind} 0.00 0 -1.58 587.0 173.3 614.1 200.1 1.65 1.67 3.64 -0.65 1.71 {z} -1.59"


KITTI_SCENES = {  # label file content -> expected class
    (("Car", 5.0), ("Pedestrian", 2.0)): 0,
    (("Van", 12.5), ("Car", 30.0)): 1,
    (("Truck", 45.0),): 2,
    (("Cyclist", 4.0), ("DontCare", -1000.0)): 3,
    (): 3,
}


def test_closest_vehicle_rule() -> None:
    def objects(*pairs):
        return [{"type": kind, "location": [0.0, 1.0, z]} for kind, z in pairs]

    assert closest_vehicle_class(objects(("Car", 8.0))) == 0  # thresholds are exclusive, as in VTAB
    assert closest_vehicle_class(objects(("Car", 8.01))) == 1
    assert closest_vehicle_class(objects(("Car", 20.0), ("Car", 50.0))) == 1
    assert closest_vehicle_class(objects(("Tram", 3.0))) == 3
    for scene, expected in KITTI_SCENES.items():
        assert closest_vehicle_class(objects(*scene)) == expected


def test_kitti_labels_images_by_closest_vehicle(tmp_path: Path) -> None:
    training = tmp_path / "Kitti" / "raw" / "training"
    expected = []
    for index in range(20):
        scene, label = list(KITTI_SCENES.items())[index % len(KITTI_SCENES)]
        save_image(training / "image_2" / f"{index:06d}.png", label, size=(12, 4))
        (training / "label_2").mkdir(parents=True, exist_ok=True)
        (training / "label_2" / f"{index:06d}.txt").write_text("".join(kitti_line(*o) + "\n" for o in scene))
        expected.append(label)
    task = get_task("kitti")
    check_splits(task, tmp_path, train_total=18, test_total=2)
    labels = [label for split in ("train", "val", "test") for _, label in task.dataset(split, data_root=tmp_path)]
    assert sorted(labels) == sorted(expected)
    for split in ("train", "test"):
        for image, label in task.load(split, tmp_path, False):
            assert image.getpixel((0, 0)) == colour(label)


# --- RESISC45 and ImageNet (ImageFolder trees) -------------------------------------------------------


def test_resisc45_reads_class_folders_and_splits_four_to_one(tmp_path: Path) -> None:
    for label, folder in enumerate(RESISC45_FOLDERS):
        for number in range(1, 6):
            save_image(tmp_path / "resisc45" / "NWPU-RESISC45" / folder / f"{folder}_{number:03d}.jpg", label)
    task = get_task("resisc45")
    check_splits(task, tmp_path, train_total=180, test_total=45)
    test = task.dataset("test", data_root=tmp_path)
    assert sorted(check_items(test, 45)) == list(range(45))
    assert all(image.getpixel((2, 2)) == pytest.approx(colour(label), abs=3) for image, label in test)


def test_imagenet_reads_train_and_val_wnid_folders(tmp_path: Path) -> None:
    wnids = [f"n{1440764 + i:08d}" for i in range(1000)]
    for label, wnid in enumerate(wnids):
        for split in ("train", "val"):
            save_image(tmp_path / "imagenet" / split / wnid / f"{wnid}_{split}.JPEG", label % 50, size=(2, 2))
    task = get_task("imagenet")
    check_splits(task, tmp_path, train_total=1000, test_total=1000)
    assert task.dataset("test", data_root=tmp_path)[999][1] == 999


def test_imagenet_with_a_subset_of_classes_is_refused(tmp_path: Path) -> None:
    for wnid in ("n01440764", "n01443537"):
        for split in ("train", "val"):
            save_image(tmp_path / "imagenet" / split / wnid / "a.JPEG", 0)
    with pytest.raises(PatcherError, match="has 2 class folders; expected the 1000"):
        get_task("imagenet").dataset("test", data_root=tmp_path)


# --- Missing data ------------------------------------------------------------------------------------

EXPECTED_PLACES = {
    "cars": "stanford_cars",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "gtsrb": "gtsrb",
    "imagenet": "imagenet",
    "kitti": "Kitti/raw",
    "mnist": "MNIST/raw",
    "resisc45": "resisc45",
    "stl10": "stl10_binary",
    "sun397": "SUN397",
    "svhn": "svhn",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PLACES))
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_missing_data_names_the_expected_place(tmp_path: Path, name: str, split: str) -> None:
    with pytest.raises(PatcherError) as raised:
        get_task(name).dataset(split, data_root=tmp_path)
    message = str(raised.value)
    assert f"not found under {tmp_path / EXPECTED_PLACES[name]}: expected " in message
    assert "--data-dir" in message and "\n" not in message


def test_gtsrb_message_names_its_layout(tmp_path: Path) -> None:
    with pytest.raises(PatcherError) as raised:
        get_task("gtsrb").dataset("train", data_root=tmp_path)
    assert str(raised.value).startswith(
        f"GTSRB not found under {tmp_path / 'gtsrb'}: expected GTSRB/Training/<00000..00042>/*.ppm"
    )
    assert str(raised.value).endswith("pass --download on a connected machine or --data-dir DIR")


def test_checksums_still_guard_the_real_classes(tmp_path: Path) -> None:
    # The stock torchvision class refuses the synthetic CIFAR files: the subclasses above only drop MD5s.
    folder = tmp_path / "cifar-10-batches-py"
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        write_pickle(folder / name, {"data": cifar_rows([0]), "labels": [0], "label_names": ["a"]})
    with pytest.raises(PatcherError, match="cifar-10-batches-py"):
        loaders.load_cifar10("test", tmp_path, False)
    assert isinstance(with_dataset_class("cifar10", UncheckedCIFAR10).load("test", tmp_path, False), ImageView)


def test_sun397_with_a_partial_class_list_is_refused(tmp_path: Path) -> None:
    (tmp_path / "SUN397").mkdir()
    (tmp_path / "SUN397" / "ClassName.txt").write_text("/a/abbey\n/b/beach\n")
    save_image(tmp_path / "SUN397" / "a" / "abbey" / "sun_a.jpg", 0)
    with pytest.raises(PatcherError, match=r"has 2 classes .* expected the 397"):
        get_task("sun397").dataset("test", data_root=tmp_path)


def test_kitti_items_pickle_for_dataloader_workers(tmp_path: Path) -> None:
    training = tmp_path / "Kitti" / "raw" / "training"
    for index in range(3):
        save_image(training / "image_2" / f"{index:06d}.png", 3)
        (training / "label_2").mkdir(parents=True, exist_ok=True)
        (training / "label_2" / f"{index:06d}.txt").write_text(kitti_line("Car", 50.0) + "\n")
    data = get_task("kitti").dataset("train", data_root=tmp_path)
    assert pickle.loads(pickle.dumps(data))[0][1] == 2


def test_unreadable_data_says_why(tmp_path: Path) -> None:
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(PatcherError) as raised:
        with_dataset_class("svhn", UncheckedSVHN).dataset("test", data_root=tmp_path)
    assert "reading it failed: MatReadError: Mat file appears to be truncated" in str(raised.value) and "\n" not in str(
        raised.value
    )
