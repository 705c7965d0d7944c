"""Tasks whose real data is on this machine: scikit-learn's digits and Debian's Fashion-MNIST."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patcher.base.errors import PatcherError
from patcher.data.tasks import get_task
from patcher.data.tasks.fashion_mnist import DEBIAN_DIR, FILES, load_fashion_mnist
from patcher.data.tasks.views import ImageView


def selected(view: ImageView) -> list[int]:
    """Indices into the innermost dataset selected by a chain of ImageViews."""
    chain = []
    while isinstance(view, ImageView):
        chain.append(view)
        view = view.base
    indices = None
    for layer in reversed(chain):  # innermost first
        if layer.indices is not None:
            indices = layer.indices.tolist() if indices is None else [indices[i] for i in layer.indices]
    return list(range(len(view))) if indices is None else indices


def test_digits_thirds_cover_all_1797_images_stratified(tmp_path: Path) -> None:
    task = get_task("digits")
    parts = {split: task.dataset(split, data_root=tmp_path) for split in ("pretrain", "train", "val", "test")}
    sizes = {split: len(data) for split, data in parts.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["pretrain"] == sizes["test"] == 599 and sizes["train"] + sizes["val"] == 599
    assert sizes["val"] == 59
    chosen = {split: selected(data) for split, data in parts.items()}
    everything = [i for indices in chosen.values() for i in indices]
    assert sorted(everything) == list(range(1797))  # disjoint and complete

    from sklearn.datasets import load_digits

    labels = load_digits().target
    per_class = Counter(labels.tolist())
    for indices in (chosen["pretrain"], chosen["test"], chosen["train"] + chosen["val"]):
        counts = Counter(labels[indices].tolist())
        for cls, total in per_class.items():
            assert abs(counts[cls] - total / 3) <= 1


def test_digits_items_are_rgb_8x8_scaled_to_255(tmp_path: Path) -> None:
    image, label = get_task("digits").dataset("test", data_root=tmp_path)[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert isinstance(label, int) and 0 <= label <= 9
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.max() > 200
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


SPLIT_IN_A_NEW_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_tasks_offline import selected
from patcher.data.tasks import get_task
print(json.dumps({f"{name}/{split}": selected(get_task(name).dataset(split, data_root=sys.argv[2]))
                  for name in ("digits", "printed-digits") for split in ("train", "val")}))
"""


def test_splits_are_the_same_in_another_process(tmp_path: Path) -> None:
    """Seeded splits depend on nothing a process carries (hash seeds, import order): a fresh interpreter, with
    another PYTHONHASHSEED, selects the same items."""
    mine = {f"{name}/{split}": selected(get_task(name).dataset(split, data_root=tmp_path))
            for name in ("digits", "printed-digits") for split in ("train", "val")}
    result = subprocess.run([sys.executable, "-c", SPLIT_IN_A_NEW_PROCESS, str(Path(__file__).parent), str(tmp_path)],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(result.stdout) == mine
    assert len(mine["digits/val"]) == 59 and not set(mine["digits/val"]) & set(mine["digits/train"])


def test_datasets_pickle_for_dataloader_workers(tmp_path: Path) -> None:
    data = get_task("digits").dataset("val", data_root=tmp_path)
    copy = pickle.loads(pickle.dumps(data))
    assert len(copy) == len(data) and copy[3][1] == data[3][1]


@pytest.mark.skipif(not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_loads_the_real_debian_files(tmp_path: Path) -> None:
    task = get_task("fashion-mnist")
    train, val, test = (task.dataset(split, data_root=tmp_path) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55_000, 5_000, 10_000)
    assert not set(selected(train)) & set(selected(val))
    assert all((tmp_path / "FashionMNIST" / "raw" / name).is_file() for name in FILES)
    image, label = task.load("train", tmp_path, False)[0]
    assert label == 9  # the first Fashion-MNIST training image is an ankle boot
    assert image.mode == "RGB" and image.size == (28, 28)
    assert Counter(test[i][1] for i in range(0, 10_000, 10)).keys() == set(range(10))


def test_fashion_mnist_missing_everywhere_names_both_places(tmp_path: Path) -> None:
    load = partial(load_fashion_mnist, debian_dir=tmp_path / "no-debian")
    with pytest.raises(PatcherError) as raised:
        load("train", tmp_path / "data", False)
    message = str(raised.value)
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "no-debian") in message
    assert "\n" not in message
