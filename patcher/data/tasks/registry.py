"""The task registry: names to tasks (class names, templates, loader), plus a user's datasets (folder:, csv:, wds:)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

import patcher.data.tasks.classnames as names
import patcher.data.tasks.csv_files as csv_files
import patcher.data.tasks.image_folders as image_folders
import patcher.data.tasks.loaders as loaders
import patcher.data.tasks.shards as shards
import patcher.data.tasks.templates as prompts
from patcher.base.errors import PatcherError
from patcher.data.tasks.digits import PARTS as DIGITS_PARTS
from patcher.data.tasks.digits import load_digits
from patcher.data.tasks.fashion_mnist import load_fashion_mnist
from patcher.data.tasks.folder import folder_task
from patcher.data.tasks.imagenet_shifts import (
    load_imagenet_a,
    load_imagenet_r,
    load_imagenet_sketch,
    load_imagenet_v2,
    load_objectnet,
    subset_columns,
)
from patcher.data.tasks.kitti import load_kitti
from patcher.data.tasks.objectnet_classes import OBJECTNET
from patcher.data.tasks.printed_digits import load_printed_digits
from patcher.data.tasks.rendered.catalog import RENDERED_TASKS
from patcher.data.tasks.task import TEST_ONLY, HeadColumns, Loader, Task
from patcher.data.tasks.typographic_digits import load_typographic_digits
from patcher.data.tasks.user_data import SPEC_HELP, Spec, parse_spec, task_name

PAINT_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "kitti", "mnist", "resisc45", "sun397", "svhn")
IMAGENET_SHIFTS = ("imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-a", "objectnet")


def imagenet_like(name: str, loader: Loader) -> Task:
    """An evaluation set with ImageNet's 1,000 classes, in its label order, and ImageNet's prompts."""
    return Task(name, names.imagenet(), prompts.imagenet(), loader, parts=TEST_ONLY)


def imagenet_subset(subset: str, loader: Loader) -> Task:
    """ImageNet-R or -A: 200 of ImageNet's classes, scored with those columns of ImageNet's head."""
    columns = subset_columns(subset)
    imagenet = names.imagenet()
    return Task(f"imagenet-{subset}", tuple(imagenet[c] for c in columns), prompts.imagenet(), loader,
                parts=TEST_ONLY, head_from=HeadColumns("imagenet", columns))


def objectnet() -> Task:
    """ObjectNet's 113 ImageNet-mapped classes: the head holds their ImageNet classes' columns, each class scoring
    the best of its columns."""
    imagenet = names.imagenet()
    columns = tuple(column for _, _, mapped in OBJECTNET for column in mapped)
    column_labels = tuple(label for label, (_, _, mapped) in enumerate(OBJECTNET) for _ in mapped)
    return Task("objectnet", tuple(imagenet[c] for c in columns), prompts.imagenet(), load_objectnet, parts=TEST_ONLY,
                head_from=HeadColumns("imagenet", columns), labels=tuple(name for _, name, _ in OBJECTNET),
                column_labels=column_labels)


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
    "imagenet-v2": lambda: imagenet_like("imagenet-v2", load_imagenet_v2),
    "imagenet-sketch": lambda: imagenet_like("imagenet-sketch", load_imagenet_sketch),
    "imagenet-r": lambda: imagenet_subset("r", load_imagenet_r),
    "imagenet-a": lambda: imagenet_subset("a", load_imagenet_a),
    "objectnet": objectnet,
    "food101": lambda: Task("food101", names.FOOD101, prompts.FOOD101, loaders.load_food101),
    "cifar10": lambda: Task("cifar10", names.CIFAR10, prompts.CIFAR10, loaders.load_cifar10),
    "cifar100": lambda: Task("cifar100", names.CIFAR100, prompts.CIFAR100, loaders.load_cifar100),
    "stl10": lambda: Task("stl10", names.STL10, prompts.STL10, loaders.load_stl10),
    "fashion-mnist": lambda: Task("fashion-mnist", names.FASHION_MNIST, prompts.FASHION_MNIST, load_fashion_mnist),
    "digits": lambda: Task("digits", names.DIGITS, prompts.DIGITS, load_digits, parts=DIGITS_PARTS),
    "printed-digits": lambda: Task("printed-digits", names.DIGITS, prompts.PRINTED_DIGITS, load_printed_digits),
    "typographic-digits": lambda: Task("typographic-digits", names.DIGITS, prompts.DIGITS, load_typographic_digits),
    **RENDERED_TASKS,
}


USER_DATASETS: dict[str, tuple[Callable[[Spec, str], Task], tuple[str, ...]]] = {
    "folder": (folder_task, ()),
    "csv": (csv_files.csv_task, csv_files.OPTIONS),
    "wds": (shards.shard_task, shards.OPTIONS),
}


def known_tasks() -> list[str]:
    """The registered task names (a user's dataset, folder:PATH, csv:PATH or wds:PATH, is accepted besides these)."""
    return sorted(_TASKS)


def get_task(name: str, task_name_: str | None = None) -> Task:
    """The task called `name` (case-insensitive, "_" read as "-"), or a user's dataset: "[NAME=]folder:PATH",
    "csv:PATH", "wds:PATH" (see user_data), named `task_name_` when given."""
    spec = user_dataset(name)
    if spec is not None:
        make, _ = USER_DATASETS[spec.kind]
        return make(spec, task_name(spec, task_name_, _TASKS))
    factory = _TASKS.get(name.strip().lower().replace("_", "-"))
    if factory is None:
        near = difflib.get_close_matches(name.strip().lower().replace("_", "-"), known_tasks(), n=3, cutoff=0.6)
        listed = f"did you mean {' or '.join(near)}? (`patcher tasks` lists all)" if near else (
            f"known tasks: {', '.join(known_tasks())}")
        raise PatcherError(f"unknown task {name!r}; {listed}, or a dataset of your own: {SPEC_HELP}")
    return factory()


def user_dataset(name: str) -> Spec | None:
    """The parsed spec when `name` is a user's dataset, else None."""
    return parse_spec(name, {kind: options for kind, (_, options) in USER_DATASETS.items()})


def short_name(name: str) -> str:
    """The name a task will have, without reading its data: `shapes` for "folder:/data/shapes"."""
    spec = user_dataset(name)
    return task_name(spec, None, _TASKS) if spec is not None else name.strip().lower().replace("_", "-")


def task_of(name: str, source: str | None) -> Task:
    """A run's task from its manifest: the user's dataset at `source` named `name`, or the registered `name`."""
    return get_task(source, name) if source else get_task(name)
