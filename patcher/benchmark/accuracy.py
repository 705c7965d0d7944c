"""Accuracy beside cost: each benchmarked model on the patch task's test split (the run's manifest where it has it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.runs.manifest import Run
from patcher.runs.weights import verified_config

SPLIT = "test"


def test_images(
    run: Run, task: str, limit: int | None, data_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Preprocessed test images of a task and their labels (a seeded subset of at most `limit`), and the split size."""
    from torch.utils.data import Subset

    from patcher.data.prepared_splits import load_images
    from patcher.data.tasks import task_of

    config = verified_config(run)
    recorded = run.manifest.tasks.get(task)
    dataset = task_of(task, recorded.source if recorded else None).dataset(SPLIT, data_root=data_dir)
    total = len(dataset)
    if total == 0:
        raise PatcherError(f"{task} has no {SPLIT} images")
    if limit is not None and total > limit:
        indices = np.sort(np.random.default_rng(0).choice(total, size=limit, replace=False))
        dataset = Subset(dataset, indices.tolist())
    images, labels = load_images(dataset, config["preprocess_cfg"], f"preparing {task}/{SPLIT}")
    return images.numpy(), labels.numpy(), total


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray, output: str, batch: int = 256) -> float:
    """Top-1 accuracy in percent of one logits output of an ONNX classifier, run with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predicted = [
        session.run([output], {name: images[start : start + batch]})[0].argmax(axis=1)
        for start in range(0, len(images), batch)
    ]
    return round(100.0 * float((np.concatenate(predicted) == labels).mean()), 4)


def accuracy_record(
    run: Run,
    onnx_files: dict[str, Path],
    output: str,
    limit: int | None = 5000,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Accuracy on the patch task's test split: the manifest's figures, and onnxruntime's where needed.

    onnxruntime runs the output-space ensemble (the manifest has no figure for it) and the patched model (a check
    that this pipeline reproduces the manifest); every file when only a subset of the split is used, so that
    figures compared side by side come from the same images. Unreadable data: manifest figures and an "error".
    """
    task = run.manifest.patch_tasks[0]
    manifest = run.manifest.test_accuracy
    record: dict[str, Any] = {
        "task": task,
        "split": SPLIT,
        "manifest": {kind: values.get(task) for kind, values in manifest.items()},
        "onnxruntime": {},
    }
    try:
        images, labels, total = test_images(run, task, limit, data_dir)
    except PatcherError as error:
        record["error"] = str(error)
        return record
    record.update(images=len(labels), split_size=total)
    subset = len(labels) < total
    for kind, path in onnx_files.items():
        if subset or kind in ("patched", "outensemble") or kind not in record["manifest"]:
            record["onnxruntime"][kind] = onnx_accuracy(path, images, labels, output)
    return record


def accuracy_of(record: dict[str, Any] | None, kind: str) -> float | None:
    """The accuracy to show for a kind: the manifest's on the full split, else onnxruntime's on the images used."""
    if not record:
        return None
    measured = record.get("onnxruntime", {}).get(kind)
    full = record.get("images") is not None and record.get("images") == record.get("split_size")
    manifest = record.get("manifest", {}).get(kind)
    if manifest is not None and (full or measured is None):
        return manifest
    return measured
