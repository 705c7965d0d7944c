"""The case studies' registry task `typographic-digits`: handwritten digits beside a printed, wrong digit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from patcher.data.tasks import get_task
from patcher.data.tasks.digits import load_digits
from patcher.data.tasks.typographic_digits import HALF, rendered


def test_each_item_is_its_handwritten_digit_labelled_beside_another_printed_digit() -> None:
    task = get_task("typographic-digits")
    assert task.classnames == tuple("0123456789") and task.templates == get_task("digits").templates
    for part in ("train", "test"):
        images, labels, printed = rendered(part)
        hands = load_digits(part, None, False)  # type: ignore[arg-type]
        assert images.shape == (len(hands), 28, 28) and images.dtype == np.uint8
        assert list(labels) == [hands[i][1] for i in range(len(hands))]  # the label is the handwriting's
        assert (printed != labels).all()  # the print always names another digit
        counts = np.bincount((printed - labels) % 10, minlength=10)
        assert counts[0] == 0 and counts[1:].min() > len(labels) / 9 * 0.6  # every other digit, about evenly
        # the print on the right half only, the handwriting on the left half
        left, right = images[:, :, :HALF].astype(int), images[:, :, HALF:].astype(int)
        assert (right.reshape(len(images), -1).max(axis=1) > 150).all()
        assert (left.reshape(len(images), -1).max(axis=1) > 100).all()


def test_items_are_seeded_and_do_not_depend_on_the_process() -> None:
    images, labels, printed = rendered("test")
    code = ("from patcher.data.tasks.typographic_digits import rendered; import hashlib; i, l, p = rendered('test'); "
            "print(hashlib.sha256(i.tobytes() + l.tobytes() + p.tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert other == hashlib.sha256(images.tobytes() + labels.tobytes() + printed.tobytes()).hexdigest()
    data = get_task("typographic-digits").dataset("test")
    image, label = data[5]
    assert image.mode == "RGB" and image.size == (28, 28) and label == labels[5]
    assert (np.asarray(image)[:, :, 0] == images[5]).all()


def test_train_and_test_are_digits_own_parts_with_a_held_out_split() -> None:
    task = get_task("typographic-digits")
    train, val, test = (task.dataset(split) for split in ("train", "val", "test"))
    assert len(train) + len(val) == len(rendered("train")[0]) and len(test) == len(rendered("test")[0])
    assert len(val) == int(len(rendered("train")[0]) * 0.1)
