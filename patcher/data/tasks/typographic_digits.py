"""Typographic digits: each handwritten digit beside a printed, wrong digit (PAINT's typographic attack in miniature).

A 28 px frame, white on black: the scikit-learn digit (digits' own train or test part) scaled to 14 x 20 px on
the left half, and on the right half a different digit printed in one of matplotlib's fonts. The printed digit
is drawn from a generator seeded by (part, index), never equal to the label; the label is the handwritten digit.
A model that reads print well and handwriting poorly (the reference mini CLIP) follows the print.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from patcher.data.tasks.digits import load_digits
from patcher.data.tasks.rendered.canvas import SIZE, font, font_paths
from patcher.data.tasks.views import ArrayImages, ImageView

HALF = SIZE // 2
HAND = (HALF, 20)  # width, height of the handwritten digit on the left half
_PART_SEEDS = {"train": 10, "test": 11}


def printed_half(digit: int, rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    """[28, 14] uint8: `digit` printed in a random font at 18-23 px, rotated up to 10°, on the frame's right half."""
    chosen = font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(18, 24)))
    canvas = Image.new("L", (2 * SIZE, 2 * SIZE), 0)
    ImageDraw.Draw(canvas).text((SIZE, SIZE), str(digit), fill=255, font=chosen, anchor="mm")
    canvas = canvas.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR)
    left, top = SIZE - HALF // 2, SIZE // 2
    return np.asarray(canvas.crop((left, top, left + HALF, top + SIZE)), dtype=np.uint8)


def compose(hand: Image.Image, printed: np.ndarray) -> np.ndarray:
    """[28, 28] uint8: the handwritten digit on the left half, the printed glyph on the right half."""
    frame = Image.new("L", (SIZE, SIZE), 0)
    frame.paste(hand.convert("L").resize(HAND, Image.Resampling.BICUBIC), (0, (SIZE - HAND[1]) // 2))
    pixels = np.asarray(frame, dtype=np.uint8).copy()
    pixels[:, HALF:] = np.maximum(pixels[:, HALF:], printed)
    return pixels


def wrong_digit(label: int, rng: np.random.Generator) -> int:
    """A digit other than `label`, uniformly among the nine others."""
    return int((label + rng.integers(1, 10)) % 10)


@cache
def rendered(part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels, printed digits) of digits' train or test part, each item seeded alone."""
    hands = load_digits(part, Path("."), False)
    fonts = font_paths()
    images, labels, printed = [], [], []
    for index in range(len(hands)):
        hand, label = hands[index]
        rng = np.random.default_rng([_PART_SEEDS[part], index])
        shown = wrong_digit(label, rng)
        images.append(compose(hand, printed_half(shown, rng, fonts)))
        labels.append(label)
        printed.append(shown)
    arrays = np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(printed, dtype=np.int64)
    for array in arrays:
        array.setflags(write=False)
    return arrays


def load_typographic_digits(part: str, root: Path, download: bool) -> Dataset:
    """The train or test part (digits' own) as RGB items labelled with the handwritten digit; root is not used."""
    images, labels, _ = rendered(part)
    return ImageView(ArrayImages(images, labels))
