"""The task registry: names to tasks (class names, templates, loader), plus "folder:PATH" datasets."""

from __future__ import annotations

from collections.abc import Callable

from patcher.base.errors import PatcherError
from patcher.data.tasks import classnames as names
from patcher.data.tasks import image_folders, loaders
from patcher.data.tasks import templates as prompts
from patcher.data.tasks.digits import PARTS as DIGITS_PARTS
from patcher.data.tasks.digits import load_digits
from patcher.data.tasks.fashion_mnist import load_fashion_mnist
from patcher.data.tasks.folder import PREFIX as FOLDER_PREFIX
from patcher.data.tasks.folder import folder_task
from patcher.data.tasks.kitti import load_kitti
from patcher.data.tasks.printed_digits import load_printed_digits
from patcher.data.tasks.task import Task

PAINT_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "kitti", "mnist", "resisc45", "sun397", "svhn")

# Factories, so that a task is only built (ImageNet's names need open_clip) when it is asked for.
_TASKS: dict[str, Callable[[], Task]] = {
    "cars": lambda: Task("cars", names.CARS, prompts.CARS, loaders.load_cars),
    "dtd": lambda: Task("dtd", names.DTD, prompts.DTD, loaders.load_dtd),
    "eurosat": lambda: Task("eurosat", names.EUROSAT, prompts.EUROSAT, loaders.load_eurosat),
    "gtsrb": lambda: Task("gtsrb", names.GTSRB, prompts.GTSRB, loaders.load_gtsrb),
    "kitti": lambda: Task("kitti", names.KITTI, prompts.KITTI, load_kitti),
    "mnist": lambda: Task("mnist", names.MNIST, prompts.MNIST, loaders.load_mnist),
    "resisc45": lambda: Task("resisc45", names.RESISC45, prompts.RESISC45, image_folders.load_resisc45),
    "sun397": lambda: Task("sun397", names.SUN397, prompts.SUN397, loaders.load_sun397),
    "svhn": lambda: Task("svhn", names.SVHN, prompts.SVHN, loaders.load_svhn),
    "imagenet": lambda: Task("imagenet", names.imagenet(), prompts.imagenet(), image_folders.load_imagenet),
    "cifar10": lambda: Task("cifar10", names.CIFAR10, prompts.CIFAR10, loaders.load_cifar10),
    "cifar100": lambda: Task("cifar100", names.CIFAR100, prompts.CIFAR100, loaders.load_cifar100),
    "stl10": lambda: Task("stl10", names.STL10, prompts.STL10, loaders.load_stl10),
    "fashion-mnist": lambda: Task("fashion-mnist", names.FASHION_MNIST, prompts.FASHION_MNIST, load_fashion_mnist),
    "digits": lambda: Task("digits", names.DIGITS, prompts.DIGITS, load_digits, parts=DIGITS_PARTS),
    "printed-digits": lambda: Task("printed-digits", names.DIGITS, prompts.PRINTED_DIGITS, load_printed_digits),
}


def known_tasks() -> list[str]:
    """The registered task names (a "folder:PATH" task is accepted besides these)."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive, "_" read as "-"), or "folder:PATH" for an ImageFolder."""
    if name.startswith(FOLDER_PREFIX):
        return folder_task(name)
    factory = _TASKS.get(name.strip().lower().replace("_", "-"))
    if factory is None:
        raise PatcherError(
            f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}, or folder:PATH for a dataset "
            "in ImageFolder layout"
        )
    return factory()
