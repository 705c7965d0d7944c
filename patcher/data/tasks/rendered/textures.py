"""Texture tasks (a miniature of DTD): black-and-white textures at one scale (a pretraining source) and the same
textures in colour, at other scales and angles, noisy (a patch task)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from patcher.data.tasks.rendered.canvas import SIZE, add_noise, colour_pair, paint

# Names from DTD's 47 (Cimpoi et al., CVPR 2014) that a 28 px frame can show.
TEXTURES = ("striped", "chequered", "dotted", "grid", "zigzagged", "crosshatched", "blotchy", "spiralled")


def _frac(values: np.ndarray) -> np.ndarray:
    return values - np.floor(values)


def texture_mask(label: int, period: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """[28, 28] uint8 (0 or 255): texture `label` with the given period (px) and angle (radians), random phase."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    xs, ys = xs - SIZE / 2 + rng.uniform(0, period), ys - SIZE / 2 + rng.uniform(0, period)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    name = TEXTURES[label]
    if name == "striped":
        mask = _frac(u / period) < 0.45
    elif name == "chequered":
        mask = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif name == "dotted":
        mask = (_frac(u / period) - 0.5) ** 2 + (_frac(v / period) - 0.5) ** 2 < 0.22**2
    elif name == "grid":
        mask = (_frac(u / period) < 0.22) | (_frac(v / period) < 0.22)
    elif name == "zigzagged":
        tooth = np.abs(_frac(u / period) - 0.5) * period
        mask = _frac((v + tooth) / period) < 0.4
    elif name == "crosshatched":
        mask = (_frac((u + v) / (1.4 * period)) < 0.2) | (_frac((u - v) / (1.4 * period)) < 0.2)
    elif name == "blotchy":
        cells = rng.random((5, 5)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(cells, mode="F").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        mask = smooth > np.median(smooth)
    else:  # spiralled
        radius = np.hypot(u, v)
        mask = _frac((radius + period * np.arctan2(v, u) / (2 * np.pi)) / period) < 0.45
    return (mask * 255).astype(np.uint8)


def plain_texture(label: int, rng: np.random.Generator) -> np.ndarray:
    """The texture white on black, period 6-8 px, nearly axis-aligned (the pretraining domain)."""
    return texture_mask(label, float(rng.uniform(6.0, 8.0)), float(np.radians(rng.uniform(-8, 8))), rng)


def coloured_texture(label: int, rng: np.random.Generator) -> np.ndarray:
    """The texture in two colours of modest contrast, period 3.5-11 px, at any angle, with noise."""
    mask = texture_mask(label, float(rng.uniform(3.5, 11.0)), float(rng.uniform(0, np.pi)), rng)
    foreground, background = colour_pair(rng, min_contrast=50)
    return add_noise(paint(mask, foreground, background), rng, sigma=14.0)
