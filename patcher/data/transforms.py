"""The model's image transforms: open_clip's train and eval transforms, and the eval transform cut in two.

The eval transform is resize, centre crop, RGB, to-tensor, normalise. Its first half (a PIL image in,
the model-sized RGB image out) is what an image store keeps as uint8 pixels; `Normalize` is the second
half, applied to whole batches (on the GPU when there is one) with the same arithmetic as
torchvision's ToTensor and Normalize, so store and transform give bit-identical tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from patcher.base.compat import import_open_clip

import_open_clip()  # makes torchvision, which open_clip imports, importable first
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

Transform = Callable[[Image.Image], Any]
_PREPROCESS_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}


def _config(preprocess_cfg: Mapping[str, Any]) -> PreprocessCfg:
    return PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in _PREPROCESS_KEYS})


def eval_transform(preprocess_cfg: Mapping[str, Any]) -> Transform:
    """open_clip's evaluation transform (resize, centre crop, RGB, to tensor, normalise) for a PIL image."""
    return image_transform_v2(_config(preprocess_cfg), is_train=False)


def train_transform(preprocess_cfg: Mapping[str, Any]) -> Transform:
    """open_clip's training transform (random resized crop at scale 0.9-1, RGB, to tensor, normalise)."""
    return image_transform_v2(_config(preprocess_cfg), is_train=True)


def image_size(preprocess_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of the model's input."""
    size = _config(preprocess_cfg).size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def geometric_transform(preprocess_cfg: Mapping[str, Any]) -> Transform:
    """The eval transform up to the tensor conversion: a PIL image in, the model-sized RGB PIL image out."""
    return _Compose(eval_transform(preprocess_cfg).transforms[:-2])


class _Compose:
    def __init__(self, steps: list[Transform]) -> None:
        self.steps = steps

    def __call__(self, image: Image.Image) -> Image.Image:
        for step in self.steps:
            image = step(image)
        return image


def to_pixels(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as a uint8 [H, W, 3] array."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class Normalize:
    """uint8 pixels [N, H, W, 3] to the model's normalised float32 input [N, 3, H, W], on the pixels' device."""

    def __init__(self, preprocess_cfg: Mapping[str, Any]) -> None:
        config = _config(preprocess_cfg)
        self.mean = torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255)  # one float copy, the rest in place
        return images.sub_(self.mean.to(images.device)).div_(self.std.to(images.device))
