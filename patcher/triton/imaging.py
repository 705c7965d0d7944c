"""Images as the preprocessing model sees them: limits checked from the header, decoded, and turned into the
classifier's input exactly as open_clip's evaluation transform does (PIL resize, centre crop or pad, RGB,
ToTensor, Normalize), with PIL and numpy only.

One module for both sides: `patcher triton` copies it beside the model.py of every model that takes encoded images
(as `patcher_imaging.py`, so it runs in NVIDIA's container too: `pip install pillow numpy` there), and the patcher
client imports it for `--raw` requests, so a client-side tensor is the server's to the bit.

Bounds, all checked before a pixel is decoded: per image (encoded bytes, pixels, aspect ratio), per request (its
encoded bytes and decoded pixels together), and per server (decoded pixels held at once by all of a server's
python stubs together, shared through byte-range locks on the file `PATCHER_DECODE_BUDGET` names; without it,
per process). One byte of that file stands for one megapixel being decoded.
"""

from __future__ import annotations

import fcntl
import io
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "PPM", "BMP", "GIF", "TIFF", "WEBP")
# Safe defaults: a 36-megapixel photo decodes in well under 300 MB; panoramas up to 12:1 pass.
# A request carries at most 64 MB of encoded images and decodes at most 144 megapixels (4 of the largest images);
# the server decodes at most 72 megapixels at once (two of the largest), whatever the number of requests.
DEFAULT_LIMITS: dict[str, Any] = {"max_bytes": 16 << 20, "max_pixels": 36_000_000, "max_aspect": 12.0,
                                  "jpeg_draft": True, "max_request_bytes": 64 << 20,
                                  "max_request_pixels": 144_000_000, "max_server_pixels": 72_000_000}
POSITIVE = ("max_bytes", "max_pixels", "max_aspect", "max_request_bytes", "max_request_pixels", "max_server_pixels")
BUDGET_ENV = "PATCHER_DECODE_BUDGET"
BUDGET_UNIT = 1_000_000  # pixels per byte of the budget file
BUDGET_WAIT_S = 20.0
DRAFT_MARGIN = 2  # a JPEG is decoded at reduced scale only down to twice the size the resize produces
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class ImageRejected(ValueError):
    """An image refused before decoding (a limit) or that does not decode; the message says which and why."""


class ServerBusy(RuntimeError):
    """The server's decoding budget stayed taken by other requests for BUDGET_WAIT_S: try again later."""


def check_limits(limits: dict[str, Any]) -> dict[str, Any]:
    """The limits with defaults filled in; ValueError for a value that is not positive or a budget too small."""
    merged = {**DEFAULT_LIMITS, **(limits or {})}
    for key in POSITIVE:
        if not float(merged[key]) > 0:
            raise ValueError(f"limit {key} must be positive, got {merged[key]!r}")
    for total in ("max_request_pixels", "max_server_pixels"):
        if merged[total] < merged["max_pixels"]:
            raise ValueError(f"limit {total}={merged[total]} is below max_pixels={merged['max_pixels']}: "
                             "an image within the limits could never be decoded")
    return merged


class DecodeBudget:
    """Decoded pixels held at once by every process that shares the budget file (byte-range locks, which the
    kernel drops when a process dies); without a file, by this process alone."""

    def __init__(self, total_pixels: int, path: str | None = None) -> None:
        self.units = max(1, int(total_pixels) // BUDGET_UNIT)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None

    @classmethod
    def from_environment(cls, limits: dict[str, Any]) -> DecodeBudget:
        """The server's budget when `patcher serve` shares one (PATCHER_DECODE_BUDGET), else this process's."""
        return cls(int(limits["max_server_pixels"]), os.environ.get(BUDGET_ENV) or None)

    def _take(self, units: int) -> int | None:
        assert self.fd is not None
        for start in range(self.units - units + 1):
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, units, start)
                return start
            except OSError:
                continue
        return None

    @contextmanager
    def hold(self, pixels: int, wait_s: float = BUDGET_WAIT_S) -> Iterator[None]:
        """Hold `pixels` of the budget for the block, waiting up to `wait_s` for other decoders; ServerBusy after."""
        units = min(self.units, max(1, math.ceil(pixels / BUDGET_UNIT)))
        if self.fd is None:
            yield
            return
        deadline = time.monotonic() + wait_s
        while (start := self._take(units)) is None:
            if time.monotonic() > deadline:
                raise ServerBusy(f"the server is decoding {self.units * BUDGET_UNIT} pixels of other requests "
                                 f"(max_server_pixels) for more than {wait_s:.0f} s: try again later")
            time.sleep(0.005)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, units, start)


# the first bytes of PNG, JPEG, GIF and WebP/BMP files written as base64 text
_BASE64_STARTS = (b"iVBORw0KGgo", b"/9j/", b"R0lGOD", b"UklGR", b"Qk")


def _base64_hint(data: bytes) -> str:
    """What to do when the bytes are an image file written as base64 text (a JSON body's habit), else ""."""
    if not data.lstrip().startswith(_BASE64_STARTS):
        return ""
    return ("these bytes are base64 text of an image file: send the file's own bytes (tritonclient's BYTES input, "
            "or a JSON body's binary_data extension; docs/serving.md)")


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
        reason = _base64_hint(data) or f"not a format this server reads ({', '.join(FORMATS)})"
        raise ImageRejected(f"cannot decode image ({len(data)} bytes): {reason}") from None
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


def _drafted(data: bytes, limits: dict[str, Any], spec: dict[str, Any] | None) -> Image.Image:
    """open_image, then (with `spec` and `jpeg_draft`) a large JPEG set to decode at the smallest DCT scale still
    twice the resize target: its size is then the size it will decode to."""
    image = open_image(data, limits)
    if spec is not None and limits["jpeg_draft"] and image.format == "JPEG":
        width, height = _resized_size(*image.size, spec)
        image.draft(None, (DRAFT_MARGIN * width, DRAFT_MARGIN * height))
    return image


def _load(image: Image.Image, size: int) -> Image.Image:
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data
        raise ImageRejected(f"cannot decode image ({size} bytes): {type(error).__name__}: {error}") from None
    return image


def decode_image(data: bytes, limits: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> Image.Image:
    """A decoded PIL image from encoded bytes within `limits`; with `spec` and `jpeg_draft`, a large JPEG is decoded
    at the smallest DCT scale still twice the resize target. ImageRejected (a ValueError) saying why otherwise."""
    limits = check_limits(limits or {})
    return _load(_drafted(data, limits, spec), len(data))


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


def preprocess_bytes(items: list[bytes], spec: dict[str, Any], limits: dict[str, Any] | None = None,
                     budget: DecodeBudget | None = None) -> np.ndarray:
    """One request's encoded images to a [N, 3, H, W] batch, decoded one at a time within the server's `budget`.

    ImageRejected naming the request's total or the first item refused, and why; ServerBusy if the budget stays
    taken. Every header is read, and the request's totals checked, before any image is decoded.
    """
    limits = check_limits(limits or {})
    total = sum(len(data) for data in items)
    if total > limits["max_request_bytes"]:
        raise ImageRejected(f"request of {len(items)} images, {total} bytes, exceeds "
                            f"max_request_bytes={limits['max_request_bytes']}")
    images = []
    for index, data in enumerate(items):
        try:
            images.append(_drafted(data, limits, spec))
        except ValueError as error:
            raise ImageRejected(f"item {index}: {error}") from None
    pixels = [image.size[0] * image.size[1] for image in images]
    if sum(pixels) > limits["max_request_pixels"]:
        raise ImageRejected(f"request of {len(items)} images decodes to {sum(pixels)} pixels, more than "
                            f"max_request_pixels={limits['max_request_pixels']}")
    budget = budget or DecodeBudget(limits["max_server_pixels"])
    batch = np.empty((len(items), 3, *spec["image_size"]), dtype=spec.get("dtype", "float32"))
    for index, image in enumerate(images):
        try:
            with budget.hold(pixels[index]):
                batch[index] = preprocess_image(_load(image, len(items[index])), spec)
        except ValueError as error:
            raise ImageRejected(f"item {index}: {error}") from None
        finally:
            image.close()  # its decoded pixels go now, not with the request
    return batch
