"""Printed digits 0-9 rendered from the fonts matplotlib bundles: seeded, deterministic, always offline.

White on black, 28 px, each image with its own font, size, offset and rotation, all drawn from a
generator seeded by (part, index), so an item never depends on which others were rendered. It gives
the reference mini CLIP the names of the ten digits in another visual domain than the handwritten
`digits` it is patched on, as CLIP knows class names whose images it has rarely seen.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from patcher.data.tasks.rendered.canvas import glyph
from patcher.data.tasks.views import ArrayImages, ImageView

PER_CLASS = {"train": 400, "test": 100}
_PART_SEEDS = {"train": 0, "test": 1}


def render_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One [28, 28] uint8 image of `digit`: a random font, size 22-34 px (glyphs 15-25 px high), stroke 0-1 px,
    offset up to 3 px, rotation up to 15° (`canvas.glyph`)."""
    return glyph(str(digit), rng)


@cache
def _rendered(part: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10), PER_CLASS[part])
    images = np.stack([
        render_digit(int(label), np.random.default_rng([_PART_SEEDS[part], index]))
        for index, label in enumerate(labels)
    ])
    images.setflags(write=False)
    return images, labels


def load_printed_digits(part: str, root: Path, download: bool) -> Dataset:
    """The train (400 per class) or test (100 per class) part as RGB items; root is not used."""
    images, labels = _rendered(part)
    return ImageView(ArrayImages(images, labels))
