"""KITTI as PAINT uses it: VTAB's closest-vehicle-distance classification of KITTI object images."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from patcher.data.tasks.loaders import torchvision_class
from patcher.data.tasks.missing import open_dataset
from patcher.data.tasks.splits import train_test_indices
from patcher.data.tasks.views import ImageView

VEHICLE_TYPES = ("Car", "Van", "Truck")
DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)  # metres along the camera axis, as in VTAB
NO_VEHICLE_DISTANCE = 1000.0


def closest_vehicle_class(objects: list[dict]) -> int:
    """VTAB's label: 0 if the closest car, van or truck is within 8 m, 1 within 20 m, 2 farther, 3 none."""
    distances = [obj["location"][2] for obj in objects if obj["type"] in VEHICLE_TYPES]
    closest = min([*distances, NO_VEHICLE_DISTANCE])
    return sum(threshold < closest for threshold in DISTANCE_THRESHOLDS) - 1


def load_kitti(part: str, root: Path, download: bool, dataset_class: str | type = "Kitti") -> Dataset:
    """KITTI's labelled training images from root/Kitti/raw, split 9:1 by a seeded permutation.

    Only KITTI's training images have labels, so train and test both come from them (VTAB does the same,
    by video; torchvision's layout has no video ids, so this split is by image).
    """
    cls = torchvision_class(dataset_class)
    data = open_dataset(
        lambda: cls(str(root), train=True, download=download),
        title="KITTI",
        where=root / "Kitti" / "raw",
        expected="training/image_2/*.png and training/label_2/*.txt (the object detection benchmark)",
        download=download,
    )
    indices = train_test_indices([0] * len(data), weights=(9, 1), keys=list(data.images))[part]
    return ImageView(data, indices, target=closest_vehicle_class)
