"""What the rendered tasks share: the frame size, matplotlib's bundled fonts, colours, noise, seeded parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from patcher.data.tasks.views import ArrayImages, ImageView

SIZE = 28
FONT_FILES = (  # those of matplotlib's fonts that hold digits and Latin capitals as text glyphs
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)
PARTS = ("train", "test")

# A renderer draws one image of class `label`: uint8 [28, 28] (grey) or [28, 28, 3] (RGB).
Renderer = Callable[[int, np.random.Generator], np.ndarray]


def font_paths() -> list[Path]:
    """The bundled font files glyphs are drawn in."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [folder / name for name in FONT_FILES if (folder / name).is_file()]


@cache
def font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    """A FreeType font at `size` px, loaded once."""
    return ImageFont.truetype(str(path), size)


def random_font(rng: np.random.Generator, sizes: tuple[int, int]) -> ImageFont.FreeTypeFont:
    """One of the bundled fonts at a size drawn from [low, high)."""
    fonts = font_paths()
    return font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(*sizes)))


def glyph(text: str, rng: np.random.Generator, sizes: tuple[int, int] = (22, 35), max_rotation: float = 15.0,
          max_shift: int = 3) -> np.ndarray:
    """[28, 28] uint8: `text` white on black in a random font and size, stroke 0-1 px, shifted and rotated."""
    chosen = random_font(rng, sizes)
    canvas = Image.new("L", (2 * SIZE, 2 * SIZE), 0)
    ImageDraw.Draw(canvas).text((SIZE, SIZE), text, fill=255, font=chosen, anchor="mm",
                                stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
    canvas = canvas.rotate(float(rng.uniform(-max_rotation, max_rotation)), resample=Image.Resampling.BILINEAR)
    dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    left, top = SIZE // 2 - dx, SIZE // 2 - dy
    return np.asarray(canvas.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8)


def colour_pair(rng: np.random.Generator, min_contrast: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) RGB colours whose mean brightness differs by at least `min_contrast`."""
    while True:
        foreground, background = rng.integers(0, 256, size=(2, 3))
        if abs(int(foreground.sum()) - int(background.sum())) >= 3 * min_contrast:
            return foreground.astype(np.uint8), background.astype(np.uint8)


def paint(mask: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8: a [H, W] coverage mask (0-255) blended from `background` to `foreground`."""
    weight = mask.astype(np.float32)[..., None] / 255.0
    blended = background.astype(np.float32) * (1.0 - weight) + foreground.astype(np.float32) * weight
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def add_noise(pixels: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """`pixels` with Gaussian noise of standard deviation `sigma` grey levels, clipped to uint8."""
    noisy = pixels.astype(np.float32) + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class RenderedSet:
    """A task's images drawn by `render`: `per_class` items of each class in the train and the test part."""

    name: str
    classes: int
    render: Renderer
    per_class: tuple[int, int]  # (train, test)
    seed: int

    def load(self, part: str, root: Path, download: bool) -> Dataset:
        """The train or test part as RGB items (a task Loader); root is not used."""
        images, labels = rendered(self, part)
        return ImageView(ArrayImages(images, labels))


@lru_cache(maxsize=16)
def rendered(spec: RenderedSet, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one part, each image drawn by a generator seeded by (seed, part, index) alone."""
    number = PARTS.index(part)
    labels = np.repeat(np.arange(spec.classes), spec.per_class[number])
    images = np.stack([spec.render(int(label), np.random.default_rng([spec.seed, number, index]))
                       for index, label in enumerate(labels)])
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class RecolouredView(Dataset):
    """Items of `base` with a seeded share drawn in two random colours (the grey level mapped from one colour to the
    other, so dark-on-light happens too): the variety of colour and polarity a web-scale corpus has."""

    def __init__(self, base: Dataset, share: float, seed: int) -> None:
        self.base = base
        self.share = share
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        rng = np.random.default_rng([self.seed, index])
        if rng.random() >= self.share:
            return image, label
        ink, paper = colour_pair(rng, min_contrast=90)
        return Image.fromarray(paint(np.asarray(image.convert("L")), ink, paper)), label
