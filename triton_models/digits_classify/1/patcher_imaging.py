"""Images as the preprocessing model sees them: limits checked from the header, decoded, and turned into the
classifier's input exactly as open_clip's evaluation transform does (PIL resize, centre crop or pad, RGB,
ToTensor, Normalize), with PIL and numpy only.

One module for both sides: `patcher triton` copies it beside the preprocessing model's model.py (as
`patcher_imaging.py`, so it runs in NVIDIA's container too: `pip install pillow numpy` there), and the patcher
client imports it for `--raw` requests, so a client-side tensor is the server's to the bit.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "PPM", "BMP", "GIF", "TIFF", "WEBP")
# Safe defaults: a 36-megapixel photo decodes in well under 300 MB; panoramas up to 12:1 pass.
DEFAULT_LIMITS: dict[str, Any] = {"max_bytes": 16 << 20, "max_pixels": 36_000_000, "max_aspect": 12.0,
                                  "jpeg_draft": True}
DRAFT_MARGIN = 2  # a JPEG is decoded at reduced scale only down to twice the size the resize produces
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class ImageRejected(ValueError):
    """An image refused before decoding (a limit) or that does not decode; the message says which and why."""


def check_limits(limits: dict[str, Any]) -> dict[str, Any]:
    """The limits with defaults filled in; ValueError for a value that is not positive."""
    merged = {**DEFAULT_LIMITS, **(limits or {})}
    for key in ("max_bytes", "max_pixels", "max_aspect"):
        if not float(merged[key]) > 0:
            raise ValueError(f"limit {key} must be positive, got {merged[key]!r}")
    return merged


def open_image(data: bytes, limits: dict[str, Any] | None = None) -> Image.Image:
    """A lazily decoded PIL image after its header passed the limits; ImageRejected naming the limit otherwise."""
    limits = check_limits(limits or {})
    if len(data) > limits["max_bytes"]:
        raise ImageRejected(f"image of {len(data)} bytes exceeds max_bytes={limits['max_bytes']}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageRejected(f"image exceeds max_pixels={limits['max_pixels']} ({error})") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"cannot decode image ({len(data)} bytes): not a format this server reads "
                            f"({', '.join(FORMATS)})") from None
    except Exception as error:  # PIL raises many types for corrupt headers
        raise ImageRejected(f"cannot decode image ({len(data)} bytes): {type(error).__name__}: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image of {width} x {height} pixels is empty")
    if width * height > limits["max_pixels"]:
        raise ImageRejected(f"image of {width} x {height} = {width * height} pixels exceeds "
                            f"max_pixels={limits['max_pixels']}")
    aspect = max(width, height) / min(width, height)
    if aspect > limits["max_aspect"]:
        raise ImageRejected(f"image of {width} x {height} pixels has aspect ratio {aspect:.1f}, more than "
                            f"max_aspect={limits['max_aspect']}")
    return image


def decode_image(data: bytes, limits: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> Image.Image:
    """A decoded PIL image from encoded bytes within `limits`; with `spec` and `jpeg_draft`, a large JPEG is decoded
    at the smallest DCT scale still twice the resize target. ImageRejected (a ValueError) saying why otherwise."""
    limits = check_limits(limits or {})
    image = open_image(data, limits)
    if spec is not None and limits["jpeg_draft"] and image.format == "JPEG":
        width, height = _resized_size(*image.size, spec)
        image.draft(None, (DRAFT_MARGIN * width, DRAFT_MARGIN * height))
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data
        raise ImageRejected(f"cannot decode image ({len(data)} bytes): {type(error).__name__}: {error}") from None
    return image


def _resized_size(width: int, height: int, spec: dict[str, Any]) -> tuple[int, int]:
    """(width, height) after resizing, exactly as torchvision's Resize / open_clip's ResizeKeepRatio compute it."""
    target_h, target_w = spec["image_size"]
    mode = spec.get("resize_mode", "shortest")
    if mode == "squash":
        return target_w, target_h
    if mode == "shortest" and target_h == target_w:  # torchvision Resize(int): shortest edge, long edge truncated
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target_h, int(target_h * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    ratio_h, ratio_w = height / target_h, width / target_w
    longest = 1.0 if mode == "longest" else 0.0
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(width / ratio), round(height / ratio)


def _center_crop_or_pad(image: Image.Image, height: int, width: int, fill: int) -> Image.Image:
    """torchvision's center_crop (pad with `fill` first when the image is smaller, then crop)."""
    image_w, image_h = image.size
    if width > image_w or height > image_h:
        border = (
            (width - image_w) // 2 if width > image_w else 0,
            (height - image_h) // 2 if height > image_h else 0,
            (width - image_w + 1) // 2 if width > image_w else 0,
            (height - image_h + 1) // 2 if height > image_h else 0,
        )
        image = ImageOps.expand(image, border=border, fill=fill)
        image_w, image_h = image.size
        if (image_w, image_h) == (width, height):
            return image
    top = round((image_h - height) / 2.0)
    left = round((image_w - width) / 2.0)
    return image.crop((left, top, left + width, top + height))


def preprocess_image(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """One image to a normalised float32 [3, H, W] array: open_clip's eval transform for `spec` (export.json's)."""
    target_h, target_w = spec["image_size"]
    resample = _RESAMPLE.get(spec.get("interpolation", "bicubic"), Image.BICUBIC)
    if spec.get("resize_mode", "shortest") == "shortest" and target_h != target_w:
        resample = Image.BICUBIC  # open_clip's ResizeKeepRatio is built without the configured interpolation
    size = _resized_size(*image.size, spec)
    if size != image.size:
        image = image.resize(size, resample)
    if spec.get("resize_mode", "shortest") != "squash":
        fill = int(spec.get("fill_color", 0)) if spec.get("resize_mode") == "longest" else 0
        image = _center_crop_or_pad(image, target_h, target_w, fill)
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1))


def preprocess_bytes(items: list[bytes], spec: dict[str, Any], limits: dict[str, Any] | None = None) -> np.ndarray:
    """Encoded images to a [N, 3, H, W] batch; ImageRejected naming the first item refused and why."""
    arrays = []
    for index, data in enumerate(items):
        try:
            arrays.append(preprocess_image(decode_image(data, limits, spec), spec))
        except ValueError as error:
            raise ImageRejected(f"item {index}: {error}") from None
    return np.stack(arrays).astype(spec.get("dtype", "float32"), copy=False)
