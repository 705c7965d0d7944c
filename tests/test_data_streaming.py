"""The streaming data path: stores equal the eval transform, batches are a function of the step, faults are named."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from patcher.base.errors import PatcherError
from patcher.data.evaluation import Scorer, accuracies
from patcher.data.image_store import StoreItems, build_store, open_store
from patcher.data.items import TransformedItems
from patcher.data.options import DataOptions
from patcher.data.prepared_splits import SplitTasks, TrainSplit, prepare_splits
from patcher.data.tasks import get_task
from patcher.data.tasks.views import ArrayImages
from patcher.data.transforms import Normalize, eval_transform, train_transform
from patcher.models import load_clip
from patcher.models.classifier import MultiHeadClassifier
from patcher.training.sampling import TaskMixture

CFG = {"size": 24, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
       "interpolation": "bicubic", "resize_mode": "shortest"}


def _photos(root: Path, count: int = 12) -> Path:
    """A folder dataset of real PNG files with varied sizes and content (two classes)."""
    rng = np.random.default_rng(0)
    for number in range(count):
        folder = root / "train" / ("a" if number % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        size = (30 + 3 * number, 20 + 5 * (number % 4))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{number}.png")
    return root


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_store_gives_exactly_the_eval_transform(tmp_path: Path, in_memory: bool):
    dataset = get_task(f"folder:{_photos(tmp_path / 'd')}").dataset("train")
    store, one_off = build_store(dataset, CFG, "decoding", in_memory, cache_dir=tmp_path / "cache")
    assert one_off is None and store.in_memory == in_memory
    batch = StoreItems(store, Normalize(CFG)).__getitems__([3, 0, 1, 7])
    transform = eval_transform(CFG)
    expected = torch.stack([transform(dataset[i][0]) for i in (3, 0, 1, 7)])
    assert torch.equal(batch.images("cpu"), expected)  # bit for bit, not just close
    assert batch.labels.tolist() == [dataset[i][1] for i in (3, 0, 1, 7)]


def test_a_disk_store_is_reused_and_rebuilt_when_the_files_change(tmp_path: Path):
    root = _photos(tmp_path / "d")
    dataset = get_task(f"folder:{root}").dataset("train")
    first, _ = build_store(dataset, CFG, "decoding", False, cache_dir=tmp_path / "cache")
    inode = os.stat(first.path).st_ino
    again, _ = build_store(get_task(f"folder:{root}").dataset("train"), CFG, "decoding", False,
                           cache_dir=tmp_path / "cache")
    assert again.path == first.path and os.stat(again.path).st_ino == inode
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "train" / "a" / "1.png")  # same name, new content
    changed, _ = build_store(get_task(f"folder:{root}").dataset("train"), CFG, "decoding", False,
                             cache_dir=tmp_path / "cache")
    assert changed.path != first.path
    assert open_store(first.path.parent) is not None  # the old one is intact, merely unused


class Anonymous(Dataset):
    """Items of a kind the fingerprint does not know."""

    def __init__(self, count: int) -> None:
        self.images = [Image.new("RGB", (10, 10), (i * 20, 0, 0)) for i in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], index % 2


def test_a_dataset_without_fingerprint_gets_a_one_off_disk_store(tmp_path: Path):
    from patcher.data.image_store import remove_store

    store, one_off = build_store(Anonymous(5), CFG, "decoding", False, cache_dir=tmp_path / "cache")
    assert one_off is not None and one_off.is_dir() and len(store) == 5
    remove_store(one_off)
    assert not one_off.exists()


def _mixture(dataset: Dataset, workers: int, augment: bool = True) -> TaskMixture:
    items = TransformedItems(dataset, train_transform(CFG) if augment else eval_transform(CFG))
    return TaskMixture({"t": TrainSplit(items, workers)}, 6, seed=5)


def test_augmented_batches_are_a_function_of_the_step_whatever_the_workers(tmp_path: Path):
    dataset = get_task(f"folder:{_photos(tmp_path / 'd')}").dataset("train")
    in_process, with_workers = _mixture(dataset, 0), _mixture(dataset, 2)
    steps = [in_process.batch(step).inputs("cpu") for step in range(4)]
    assert all(torch.equal(a, with_workers.batch(s).inputs("cpu")) for s, a in enumerate(steps))
    resumed = _mixture(dataset, 2)
    assert torch.equal(resumed.batch(2).inputs("cpu"), steps[2])  # a resumed run replays the same stream
    plain = _mixture(dataset, 0, augment=False).batch(0).inputs("cpu")
    assert not torch.equal(plain, steps[0])  # the augmentation really changes the pixels
    with_workers.close()
    resumed.close()


def test_an_unreadable_file_is_named_whatever_the_workers(tmp_path: Path):
    root = _photos(tmp_path / "d")
    broken = root / "train" / "a" / "3.png"
    data = bytearray(broken.read_bytes())
    data[100:400] = bytes(300)  # header and end intact (the up-front check passes it), compressed pixels not
    broken.write_bytes(bytes(data))
    dataset = get_task(f"folder:{root}").dataset("train")
    for workers in (0, 2):
        mixture = _mixture(dataset, workers)
        with pytest.raises(PatcherError, match=r"cannot read .*3\.png"):
            for step in range(4):  # every item is read within two epochs
                mixture.batch(step)
        mixture.close()
    with pytest.raises(PatcherError, match=r"cannot read .*3\.png"):
        build_store(dataset, CFG, "decoding t/val", False, workers=1, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/store.json"))  # nothing half-written looks complete


class DiesInWorker(Dataset):
    """A reader whose worker process is killed (SIGKILL) when it reads item 3."""

    def __init__(self) -> None:
        self.inner = ArrayImages(np.zeros((8, 10, 10), dtype=np.uint8), np.zeros(8, dtype=np.int64))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if index == 3 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[index]


def test_a_worker_that_dies_stops_training_with_one_error_not_a_hang():
    mixture = _mixture(DiesInWorker(), workers=1)
    with pytest.raises(PatcherError, match=r"data loader worker .* failed .*--workers 0"):
        for step in range(4):
            mixture.batch(step)
    mixture.close()


def test_streamed_and_in_memory_evaluation_agree(tmp_path: Path):
    torch.manual_seed(0)
    loaded = load_clip("patcher-tiny")
    fashion = get_task("fashion-mnist")
    head = torch.nn.functional.normalize(torch.randn(64, 10), dim=0) * 30
    classifier = MultiHeadClassifier(loaded.model.visual, {"fashion-mnist": head})
    results = {}
    for mode in ("memory", "stream"):
        options = DataOptions(mode=mode, workers=1, cache_dir=tmp_path / "cache")
        splits = prepare_splits(SplitTasks(evaluate=[fashion]), loaded.preprocess_cfg, options)
        assert splits.val["fashion-mnist"].in_memory == (mode == "memory")
        scorer = Scorer(classifier=classifier, normalize=splits.normalize, batch_size=512)
        results[mode] = accuracies(scorer, splits.val)
    assert results["memory"] == results["stream"]
    assert 0 < results["stream"]["fashion-mnist"] < 100


def test_splits_are_found_before_anything_is_decoded(tmp_path: Path):
    loaded_cfg = {**CFG, "size": 28}
    with pytest.raises(PatcherError, match="not found"):
        prepare_splits(SplitTasks(train=[get_task("digits")], evaluate=[get_task("digits"), get_task("mnist")]),
                       loaded_cfg, DataOptions(cache_dir=tmp_path / "cache"), data_dir=tmp_path / "no-data")
    assert not (tmp_path / "cache").exists()


def test_data_options_refuse_what_cannot_work():
    with pytest.raises(PatcherError, match="--data-mode"):
        DataOptions(mode="ssd").check()
    with pytest.raises(PatcherError, match="--workers"):
        DataOptions(workers=-1).check()
    assert DataOptions().in_memory(100, {"size": 224}) and not DataOptions().in_memory(10_000, {"size": 224})
    assert not DataOptions(mode="stream").in_memory(1, {"size": 224})
