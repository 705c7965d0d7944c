"""The rendered tasks as registry entries: each set's renderer, class names, prompts and sizes."""

from __future__ import annotations

from collections.abc import Callable

import patcher.data.tasks.templates as prompts
from patcher.data.tasks.classnames import FASHION_MNIST
from patcher.data.tasks.rendered.canvas import RenderedSet
from patcher.data.tasks.rendered.glyphs import (
    DIGIT_NAMES,
    LETTERS,
    dot_matrix_letter,
    house_number,
    printed_letter,
    seven_segment_digit,
)
from patcher.data.tasks.rendered.shapes import COUNTS, SHAPES, die_face, filled_shape, outlined_shape, scattered_objects
from patcher.data.tasks.rendered.sketches import load_fashion_sketch
from patcher.data.tasks.rendered.textures import TEXTURES, coloured_texture, plain_texture
from patcher.data.tasks.task import Task

PRINTED_LETTERS = ('a photo of the letter: "{}".', 'a photo of the printed letter: "{}".',
                   'a typeset photo of the letter: "{}".')
LETTERS_PROMPTS = ('a photo of the letter: "{}".', 'a low resolution photo of the letter: "{}".',
                   'a pixelated photo of the letter: "{}".')
SHAPES_PROMPTS = ("a photo of a {}.", "a drawing of a {}.", "a {} shape.")
COUNT_PROMPTS = ("a photo of {} objects.", "an image of {} things.", "a picture showing {} items.")

_SETS = (  # name, class names, renderer, per class (train, test), seed, prompts
    ("printed-letters", LETTERS, printed_letter, (150, 50), 30, PRINTED_LETTERS),
    ("dot-matrix-letters", LETTERS, dot_matrix_letter, (150, 50), 31, LETTERS_PROMPTS),
    ("seven-segment-digits", DIGIT_NAMES, seven_segment_digit, (300, 100), 32, prompts.DIGITS),
    ("house-numbers", DIGIT_NAMES, house_number, (300, 100), 33, prompts.DIGITS),
    ("filled-shapes", SHAPES, filled_shape, (300, 100), 34, SHAPES_PROMPTS),
    ("outlined-shapes", SHAPES, outlined_shape, (300, 100), 35, SHAPES_PROMPTS),
    ("textures", TEXTURES, plain_texture, (300, 100), 36, prompts.DTD),
    ("colored-textures", TEXTURES, coloured_texture, (300, 100), 37, prompts.DTD),
    ("dice", COUNTS, die_face, (300, 100), 38, COUNT_PROMPTS),
    ("count-objects", COUNTS, scattered_objects, (400, 100), 39, COUNT_PROMPTS),
)


def _rendered_task(name: str, classnames: tuple[str, ...], render: Callable, per_class: tuple[int, int],
                   seed: int, templates: tuple[str, ...]) -> Callable[[], Task]:
    spec = RenderedSet(name, len(classnames), render, per_class, seed)
    return lambda: Task(name, classnames, templates, spec.load)


RENDERED_TASKS: dict[str, Callable[[], Task]] = {entry[0]: _rendered_task(*entry) for entry in _SETS}
RENDERED_TASKS["fashion-sketch"] = lambda: Task("fashion-sketch", FASHION_MNIST, prompts.FASHION_MNIST,
                                                load_fashion_sketch)
