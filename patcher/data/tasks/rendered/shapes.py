"""Shape tasks: filled shapes and dice (pretraining sources), outlined shapes on clutter and scattered objects to
count (patch tasks whose class names the reference model learnt from the clean ones)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from patcher.data.tasks.rendered.canvas import SIZE, add_noise, colour_pair, paint

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "arrow", "crescent")
COUNTS = ("one", "two", "three", "four", "five", "six")
# Pips of a die face on a 3 x 3 grid (row, column), for one to six.
DIE_FACES = (
    ((1, 1),), ((0, 0), (2, 2)), ((0, 0), (1, 1), (2, 2)), ((0, 0), (0, 2), (2, 0), (2, 2)),
    ((0, 0), (0, 2), (1, 1), (2, 0), (2, 2)), ((0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2)),
)


def _outline_points(shape: str) -> list[tuple[float, float]]:
    """The shape's polygon on the unit scale (radius about 1), centred at the origin, y down."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.9, 0.7), (-0.9, 0.7)]
    if shape == "star":
        return [((1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5),
                 -(1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, b = 0.3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "heart":
        return [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                              - math.cos(4 * t)) / 17 - 0.1)
                for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    if shape == "arrow":
        return [(-1.0, -0.25), (0.2, -0.25), (0.2, -0.7), (1.0, 0.0), (0.2, 0.7), (0.2, 0.25), (-1.0, 0.25)]
    raise ValueError(shape)


def shape_mask(shape: str, centre: tuple[float, float], radius: float, angle: float,
               size: int = SIZE) -> np.ndarray:
    """[size, size] uint8 coverage (0 or 255) of the filled shape."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "crescent":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        dx, dy = 0.55 * radius * math.cos(angle), 0.55 * radius * math.sin(angle)
        bite = 0.85 * radius
        draw.ellipse((cx + dx - bite, cy + dy - bite, cx + dx + bite, cy + dy + bite), fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))
                  for x, y in _outline_points(shape)]
        draw.polygon(points, fill=255)
    return np.asarray(canvas)


def _placement(rng: np.random.Generator, radius: tuple[float, float], max_rotation: float) -> tuple:
    size = float(rng.uniform(*radius))
    centre = (SIZE / 2 + float(rng.uniform(-3, 3)), SIZE / 2 + float(rng.uniform(-3, 3)))
    return centre, size, math.radians(float(rng.uniform(-max_rotation, max_rotation)))


def filled_shape(label: int, rng: np.random.Generator) -> np.ndarray:
    """A shape filled in light grey on black (the pretraining domain)."""
    centre, radius, angle = _placement(rng, (7.0, 12.0), 20.0)
    mask = shape_mask(SHAPES[label], centre, radius, angle)
    return (mask.astype(np.uint16) * int(rng.integers(170, 256)) // 255).astype(np.uint8)


def outlined_shape(label: int, rng: np.random.Generator) -> np.ndarray:
    """The shape's outline only, 1-2 px in a colour, on a coloured noisy background crossed by clutter lines."""
    centre, radius, angle = _placement(rng, (7.0, 12.5), 20.0)
    filled = Image.fromarray(shape_mask(SHAPES[label], centre, radius, angle))
    width = int(rng.integers(1, 3))
    inner = filled.filter(ImageFilter.MinFilter(2 * width + 1))
    outline = np.asarray(filled).astype(np.int16) - np.asarray(inner).astype(np.int16)
    foreground, background = colour_pair(rng, min_contrast=80)
    clutter = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, SIZE, size=4))
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(60, 140)), width=1)
    mask = np.maximum(np.clip(outline, 0, 255).astype(np.uint8), np.asarray(clutter))
    return add_noise(paint(mask, foreground, background), rng, sigma=12.0)


def die_face(label: int, rng: np.random.Generator) -> np.ndarray:
    """`label + 1` pips laid out as on a die, white on black (the pretraining domain of counting)."""
    spacing = float(rng.uniform(6.0, 8.0))
    pip = float(rng.uniform(1.8, 2.8))
    cx, cy = SIZE / 2 + float(rng.uniform(-2, 2)), SIZE / 2 + float(rng.uniform(-2, 2))
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for row, col in DIE_FACES[label]:
        x, y = cx + (col - 1) * spacing, cy + (row - 1) * spacing
        draw.ellipse((x - pip, y - pip, x + pip, y + pip), fill=255)
    return np.asarray(canvas.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR))


def scattered_objects(label: int, rng: np.random.Generator) -> np.ndarray:
    """`label + 1` small objects (circles, squares, triangles) of several colours anywhere on a noisy background."""
    background = rng.integers(0, 256, size=3).astype(np.uint8)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:
        radius = float(rng.uniform(2.0, 4.0))
        x, y = (float(v) for v in rng.uniform(radius + 1, SIZE - radius - 1, size=2))
        if any((x - px) ** 2 + (y - py) ** 2 < (radius + pr + 1.5) ** 2 for px, py, pr in placed):
            continue
        placed.append((x, y, radius))
        colour, _ = colour_pair(rng, min_contrast=0)
        while abs(int(colour.astype(np.int32).sum()) - int(background.astype(np.int32).sum())) < 180:
            colour = rng.integers(0, 256, size=3).astype(np.uint8)
        fill = tuple(int(v) for v in colour)
        kind = int(rng.integers(3))
        box = (x - radius, y - radius, x + radius, y + radius)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)
    return add_noise(np.asarray(image), rng, sigma=10.0)
