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
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from patcher.data.tasks.views import ArrayImages, ImageView

PER_CLASS = {"train": 400, "test": 100}
SIZE = 28
FONT_FILES = (  # those of matplotlib's fonts that hold the ten digits as text glyphs
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)
_PART_SEEDS = {"train": 0, "test": 1}


def font_paths() -> list[Path]:
    """The bundled font files digits are drawn in."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [folder / name for name in FONT_FILES if (folder / name).is_file()]


@cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def render_digit(digit: int, rng: np.random.Generator, fonts: list[Path]) -> np.ndarray:
    """One [28, 28] uint8 image of `digit`: a random font, size 22-34 px (glyphs 15-25 px high), stroke 0-1 px,
    offset up to 3 px, rotation up to 15°."""
    font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(22, 35)))
    canvas = Image.new("L", (2 * SIZE, 2 * SIZE), 0)
    ImageDraw.Draw(canvas).text((SIZE, SIZE), str(digit), fill=255, font=font, anchor="mm",
                                stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    left, top = SIZE // 2 - dx, SIZE // 2 - dy
    return np.asarray(canvas.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8)


@cache
def _rendered(part: str) -> tuple[np.ndarray, np.ndarray]:
    fonts = font_paths()
    labels = np.repeat(np.arange(10), PER_CLASS[part])
    images = np.stack([
        render_digit(int(label), np.random.default_rng([_PART_SEEDS[part], index]), fonts)
        for index, label in enumerate(labels)
    ])
    images.setflags(write=False)
    return images, labels


def load_printed_digits(part: str, root: Path, download: bool) -> Dataset:
    """The train (400 per class) or test (100 per class) part as RGB items; root is not used."""
    images, labels = _rendered(part)
    return ImageView(ArrayImages(images, labels))
