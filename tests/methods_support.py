"""Helpers for the method and multi-task tests: a seeded tiny CLIP on disk and small real-image folder tasks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import ImageOps
from safetensors.torch import save_file

from patcher.data.tasks import get_task
from patcher.models import load_clip
from patcher.stages.build import BuildOptions, build
from patcher.training.config import TrainConfig

TINY_STEPS = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=1, checkpoint_every=4, log_every=1)


def make_tiny_model(folder: Path, seed: int = 0) -> str:
    """A patcher-tiny CLIP with seeded random weights saved as an open_clip local-dir; returns its model name."""
    torch.manual_seed(seed)
    loaded = load_clip("patcher-tiny")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(loaded.open_clip_config()))
    return f"local-dir:{folder}"


def _write(root: Path, split: str, items: list, names: list[str]) -> None:
    for number, (image, label) in enumerate(items):
        folder = root / split / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{number:05d}.png")


def make_inverted_digits(root: Path, every: int = 3) -> str:
    """folder: task of every `every`-th digit, inverted (dark ink on white), digits' own train/test parts."""
    digits = get_task("digits")
    names = [f"{c:02d}" for c in range(len(digits.classnames))]
    for split in ("train", "test"):
        data = digits.dataset(split)
        _write(root, split, [(ImageOps.invert(data[i][0]), data[i][1]) for i in range(0, len(data), every)], names)
    (root / "classnames.txt").write_text("".join(f"{f}: {n}\n" for f, n in zip(names, digits.classnames, strict=True)))
    (root / "templates.txt").write_text("\n".join(digits.templates) + "\n")
    return f"folder:{root}"


def make_small_fashion(root: Path, train_per_class: int = 20, test_per_class: int = 10) -> str:
    """folder: task with a few Fashion-MNIST images per class (its train and test parts)."""
    fashion = get_task("fashion-mnist")
    names = [f"{c:02d}" for c in range(len(fashion.classnames))]
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        data = fashion.dataset(split)
        counts = [0] * len(names)
        items = []
        for index in range(len(data)):
            image, label = data[index]
            if counts[label] < per_class:
                counts[label] += 1
                items.append((image, label))
            if min(counts) >= per_class:
                break
        _write(root, split, items, names)
    (root / "classnames.txt").write_text("".join(f"{f}: {n}\n" for f, n in zip(names, fashion.classnames, strict=True)))
    (root / "templates.txt").write_text("\n".join(fashion.templates) + "\n")
    return f"folder:{root}"


def tiny_build(model: str, task: str, support: str, out: Path, method: str = "ft", **extra: object) -> Path:
    """`patcher build` on the tiny model with a few steps."""
    options = BuildOptions(task=task, support=[support], model=model, pretrained=None, method=method,
                           train_config=TINY_STEPS, device="cpu", out=out, **extra)  # type: ignore[arg-type]
    return build(options)
