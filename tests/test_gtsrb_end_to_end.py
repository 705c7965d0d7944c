"""End to end at 224 px on a synthetic GTSRB in torchvision's real on-disk layout: build (streamed), export."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from faults_support import run_patcher
from PIL import Image, ImageDraw

from patcher.data.tasks import get_task

pytestmark = pytest.mark.slow
CLASSES = 43


def make_gtsrb(root: Path, per_class: int = 6, test_images: int = 86, seed: int = 0) -> Path:
    """gtsrb/GTSRB/Training/<00000..00042>/*.ppm with GT-<class>.csv, Final_Test/Images/*.ppm, GT-final_test.csv.

    Signs are drawn as shapes whose colour and number of corners follow the class, 30 to 80 px like GTSRB's.
    """
    rng = np.random.default_rng(seed)
    base = root / "gtsrb" / "GTSRB"

    def sign(label: int) -> Image.Image:
        size = int(rng.integers(30, 81))
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 200, 3)))
        corners = 3 + label % 5
        angles = np.linspace(0, 2 * np.pi, corners, endpoint=False) + label
        points = [(size / 2 + size * 0.4 * np.cos(a), size / 2 + size * 0.4 * np.sin(a)) for a in angles]
        ImageDraw.Draw(image).polygon(points, fill=((label * 37) % 256, (label * 91) % 256, (label * 53) % 256))
        return image

    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for label in range(CLASSES):
        folder = base / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for track in range(per_class):
            image = sign(label)
            image.save(folder / f"00000_{track:05d}.ppm")
            rows.append(f"00000_{track:05d}.ppm;{image.width};{image.height};0;0;{image.width};{image.height};{label}")
        (folder / f"GT-{label:05d}.csv").write_text(header + "\n".join(rows) + "\n")
    rows = []
    (base / "Final_Test" / "Images").mkdir(parents=True)
    for index in range(test_images):
        label = index % CLASSES
        image = sign(label)
        image.save(base / "Final_Test" / "Images" / f"{index:05d}.ppm")
        rows.append(f"{index:05d}.ppm;{image.width};{image.height};0;0;{image.width};{image.height};{label}")
    (root / "gtsrb" / "GT-final_test.csv").write_text(header + "\n".join(rows) + "\n")
    return root


def _patcher(*arguments: str) -> subprocess.CompletedProcess[str]:
    return run_patcher(*arguments, timeout=600)


def test_gtsrb_layout_builds_and_exports_at_224_px(tmp_path: Path):
    data = make_gtsrb(tmp_path / "data")
    assert len(get_task("gtsrb").dataset("test", data_root=data)) == 86
    run = tmp_path / "run"
    built = _patcher("build", "--task", "gtsrb", "--data-dir", str(data), "--model", "patcher-tiny-p32",
                     "--pretrained", "none", "--steps", "4", "--batch-size", "43", "--lr", "1e-4", "--warmup-steps",
                     "1", "--workers", "1", "--data-mode", "stream", "--out", str(run))
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["preprocess"]["image_size"] == [224, 224]
    assert manifest["tasks"]["gtsrb"]["sizes"] == {"train": 233, "val": 25, "test": 86}  # 10% of 258 held out
    assert manifest["training"]["data"]["mode"] == "stream" and manifest["training"]["data"]["augment"] is True
    exported = _patcher("export", str(run), "--data-dir", str(data))
    assert exported.returncode == 0, exported.stderr[-3000:]
    record = json.loads((run / "onnx" / "export.json").read_text())
    assert all(report["passed"] for report in record["parity"]["models"].values())
    assert record["parity"]["models"]["patched"]["tasks"]["gtsrb"]["decisive_top1_agreement"] == 100.0
