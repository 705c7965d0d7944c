"""The rendered printed-digits task: deterministic, balanced, white digits on black, one item independent of others."""

from __future__ import annotations

import numpy as np

from patcher.data.tasks import get_task
from patcher.data.tasks.printed_digits import PER_CLASS, render_digit
from patcher.data.tasks.rendered.canvas import font_paths


def test_parts_are_balanced_and_the_same_on_every_load():
    task = get_task("printed-digits")
    test = task.dataset("test")
    labels = np.array([test[i][1] for i in range(len(test))])
    assert np.bincount(labels).tolist() == [PER_CLASS["test"]] * 10
    first = np.stack([np.asarray(test[i][0]) for i in range(0, len(test), 97)])
    from patcher.data.tasks import printed_digits

    printed_digits._rendered.cache_clear()
    again = np.stack([np.asarray(task.dataset("test")[i][0]) for i in range(0, len(test), 97)])
    assert np.array_equal(first, again)
    train, val = task.dataset("train"), task.dataset("val")
    assert len(train) + len(val) == 10 * PER_CLASS["train"]


def test_an_image_is_a_function_of_its_seed_alone():
    fonts = font_paths()
    assert len(fonts) >= 16  # matplotlib's DejaVu, STIX and Computer Modern text fonts
    one = render_digit(7, np.random.default_rng([0, 123]))
    render_digit(3, np.random.default_rng([0, 5]))
    assert np.array_equal(one, render_digit(7, np.random.default_rng([0, 123])))
    assert not np.array_equal(one, render_digit(7, np.random.default_rng([0, 124])))


def test_white_digits_on_black_in_three_channels():
    image, _ = get_task("printed-digits").dataset("test")[0]
    pixels = np.asarray(image)
    assert pixels.shape == (28, 28, 3) and image.mode == "RGB"
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert border.mean() < 40 and pixels.max() == 255 and (pixels > 128).mean() > 0.05
