"""Glyph tasks: printed letters (a pretraining source), and dot-matrix letters, seven-segment digits and house
numbers on clutter (patch tasks whose class names the reference model learnt from print)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from patcher.data.tasks.rendered.canvas import SIZE, add_noise, colour_pair, font, font_paths, glyph, paint, random_font

LETTERS = tuple(chr(ord("A") + number) for number in range(26))
DIGIT_NAMES = tuple(str(digit) for digit in range(10))
MONO_FONTS = ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")

# Segments a-g of a seven-segment display lit for each digit (a top, b upper right, c lower right, d bottom,
# e lower left, f upper left, g middle).
SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


def printed_letter(label: int, rng: np.random.Generator) -> np.ndarray:
    """A capital letter white on black in one of the bundled fonts (the pretraining domain)."""
    return glyph(LETTERS[label], rng)


def _letter_bitmap(letter: str, rng: np.random.Generator) -> np.ndarray:
    """The letter as a small boolean bitmap (about 5 x 7 cells), drawn without anti-aliasing, cropped to its ink."""
    mono = [path for path in font_paths() if path.name in MONO_FONTS]
    chosen = font(mono[int(rng.integers(len(mono)))], int(rng.integers(9, 11)))
    canvas = Image.new("L", (16, 16), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"
    draw.text((8, 8), letter, fill=255, font=chosen, anchor="mm")
    cells = np.asarray(canvas) > 127
    rows, cols = np.flatnonzero(cells.any(axis=1)), np.flatnonzero(cells.any(axis=0))
    return cells[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def dot_matrix_letter(label: int, rng: np.random.Generator) -> np.ndarray:
    """A capital letter on a dot-matrix display: round lit dots on a 3 px pitch, in a display colour, noisy."""
    cells = _letter_bitmap(LETTERS[label], rng)
    pitch = 3
    height, width = cells.shape[0] * pitch, cells.shape[1] * pitch
    top = (SIZE - height) // 2 + int(rng.integers(-2, 3))
    left = (SIZE - width) // 2 + int(rng.integers(-2, 3))
    lit, background = colour_pair(rng, min_contrast=100)
    unlit = (background.astype(np.int32) * 3 + lit.astype(np.int32)) // 4  # unlit dots show faintly
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    for row in range(cells.shape[0]):
        for col in range(cells.shape[1]):
            x, y = left + col * pitch, top + row * pitch
            colour = lit if cells[row, col] else unlit.astype(np.uint8)
            draw.ellipse((x, y, x + pitch - 1, y + pitch - 1), fill=tuple(int(v) for v in colour))
    return add_noise(np.asarray(image), rng, sigma=8.0)


def _segment_polygons(width: float, height: float, thickness: float) -> dict[str, list[tuple[float, float]]]:
    """Each segment as a polygon in a width x height box with the origin at the top left."""
    half, mid = thickness / 2, height / 2

    def horizontal(y: float) -> list[tuple[float, float]]:
        return [(half, y), (thickness, y - half), (width - thickness, y - half), (width - half, y),
                (width - thickness, y + half), (thickness, y + half)]

    def vertical(x: float, top: float, bottom: float) -> list[tuple[float, float]]:
        return [(x, top + half), (x + half, top + thickness), (x + half, bottom - thickness), (x, bottom - half),
                (x - half, bottom - thickness), (x - half, top + thickness)]

    return {"a": horizontal(half), "g": horizontal(mid), "d": horizontal(height - half),
            "f": vertical(half, 0, mid), "b": vertical(width - half, 0, mid),
            "e": vertical(half, mid, height), "c": vertical(width - half, mid, height)}


def seven_segment_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """A digit on a seven-segment display: lit segments in a display colour, unlit ones faint, slanted, noisy."""
    width, height = float(rng.integers(11, 16)), float(rng.integers(19, 25))
    thickness, slant = float(rng.uniform(2.0, 3.2)), float(rng.uniform(0.0, 0.25))
    left = (SIZE - width) / 2 + float(rng.uniform(-2, 2))
    top = (SIZE - height) / 2 + float(rng.uniform(-1.5, 1.5))
    lit, background = colour_pair(rng, min_contrast=100)
    unlit = tuple(int(v) for v in (background.astype(np.int32) * 4 + lit.astype(np.int32)) // 5)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    for name, polygon in _segment_polygons(width, height, thickness).items():
        placed = [(left + x + slant * (height - y), top + y) for x, y in polygon]
        draw.polygon(placed, fill=tuple(int(v) for v in lit) if name in SEGMENTS[label] else unlit)
    return add_noise(np.asarray(image), rng, sigma=8.0)


def house_number(label: int, rng: np.random.Generator) -> np.ndarray:
    """The digit centred between parts of its neighbours, in a colour on a shaded background, as SVHN crops are."""
    chosen = random_font(rng, (20, 31))
    strip = Image.new("L", (3 * SIZE, SIZE), 0)
    draw = ImageDraw.Draw(strip)
    centre = 3 * SIZE // 2
    advance = chosen.getlength("0") + float(rng.integers(0, 3))
    for offset in (-1, 1):
        if rng.random() < 0.8:
            draw.text((centre + offset * advance, SIZE // 2), str(int(rng.integers(10))), fill=255, font=chosen,
                      anchor="mm")
    draw.text((centre, SIZE // 2), DIGIT_NAMES[label], fill=255, font=chosen, anchor="mm")
    left = centre - SIZE // 2 + int(rng.integers(-2, 3))
    mask = np.asarray(strip.crop((left, 0, left + SIZE, SIZE)))
    foreground, background = colour_pair(rng, min_contrast=70)
    shade = np.linspace(float(rng.uniform(0.6, 1.0)), float(rng.uniform(0.6, 1.0)), SIZE, dtype=np.float32)
    image = paint(mask, foreground, background).astype(np.float32) * shade[:, None, None]
    blurred = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
    return add_noise(np.asarray(blurred), rng, sigma=10.0)
