"""Named groups of registered tasks: the offline miniature of the eight-task benchmark, the reference model's
pretraining sources, and the real benchmarks whose data a user brings."""

from __future__ import annotations

from patcher.base.errors import PatcherError
from patcher.data.tasks.registry import IMAGENET_SHIFTS, PAINT_TASKS

# The miniature of the merging literature's eight tasks (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD):
# each shows class names the reference model knows in an image domain it has not seen. Two are real images.
MINI_EIGHT = ("digits", "fashion-sketch", "house-numbers", "dot-matrix-letters", "seven-segment-digits",
              "outlined-shapes", "colored-textures", "count-objects")
MINI_EIGHT_SUPPORT = "fashion-mnist"  # the supported task: one the reference model already does well

SUITES: dict[str, tuple[str, ...]] = {
    "mini-8": MINI_EIGHT,
    "mini-8-support": (MINI_EIGHT_SUPPORT,),
    "reference-pretraining": ("fashion-mnist", "printed-digits", "printed-letters", "filled-shapes", "textures",
                              "dice"),
    "case-studies": ("typographic-digits",),
    "paint": PAINT_TASKS,
    "imagenet-shifts": IMAGENET_SHIFTS,
}


def suite_tasks(name: str) -> tuple[str, ...]:
    """The tasks of one suite."""
    if name not in SUITES:
        raise PatcherError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    return SUITES[name]


def suites_of(task: str) -> list[str]:
    """The suites a task belongs to."""
    return [name for name, tasks in SUITES.items() if task in tasks]
