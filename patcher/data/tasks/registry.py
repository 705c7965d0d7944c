"""The task registry: names to tasks (class names, templates, loader), plus a user's datasets (folder:, csv:, wds:)."""

from __future__ import annotations

from collections.abc import Callable

import patcher.data.tasks.classnames as names
import patcher.data.tasks.csv_files as csv_files
import patcher.data.tasks.image_folders as image_folders
import patcher.data.tasks.loaders as loaders
import patcher.data.tasks.shards as shards
import patcher.data.tasks.templates as prompts
from patcher.base.errors import PatcherError
from patcher.base.registries import Registered, Registry, did_you_mean
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


Factory = Callable[[], Task]
_MINE = "patcher's own"


def _task(name: str, summary: str, reference: str, builds: Factory) -> Registered[Factory]:
    return Registered(name=name, summary=summary, reference=reference, builds=builds)


# Factories, so that a task is only built (ImageNet's names need open_clip) when it is asked for.
TASKS: Registry[Registered[Factory]] = Registry("task", [
    _task("cars", "Stanford Cars: 196 car models", "Krause et al., 3D Object Representations for Fine-Grained "
          "Categorization, ICCV Workshops 2013", lambda: Task("cars", names.CARS, prompts.CARS, loaders.load_cars)),
    _task("dtd", "Describable Textures: 47 texture words", "Cimpoi et al., Describing Textures in the Wild, CVPR 2014",
          lambda: Task("dtd", names.DTD, prompts.DTD, loaders.load_dtd)),
    _task("eurosat", "EuroSAT: 10 land-use classes in Sentinel-2 satellite images", "Helber et al., EuroSAT, IEEE "
          "J-STARS 2019", lambda: Task("eurosat", names.EUROSAT, prompts.EUROSAT, loaders.load_eurosat)),
    _task("gtsrb", "German traffic signs: 43 classes", "Stallkamp et al., The German Traffic Sign Recognition "
          "Benchmark, IJCNN 2011", lambda: Task("gtsrb", names.GTSRB, prompts.GTSRB, loaders.load_gtsrb)),
    _task("kitti", "KITTI as VTAB and PAINT use it: how far the closest vehicle is",
          "Geiger et al., Are we ready for Autonomous Driving?, CVPR 2012",
          lambda: Task("kitti", names.KITTI, prompts.KITTI, load_kitti)),
    _task("mnist", "MNIST handwritten digits", "LeCun et al., Gradient-based learning applied to document "
          "recognition, 1998", lambda: Task("mnist", names.MNIST, prompts.MNIST, loaders.load_mnist)),
    _task("resisc45", "RESISC45: 45 remote-sensing scene classes", "Cheng et al., Remote Sensing Image Scene "
          "Classification, Proc. IEEE 2017",
          lambda: Task("resisc45", names.RESISC45, prompts.RESISC45, image_folders.load_resisc45)),
    _task("sun397", "SUN397: 397 scene categories", "Xiao et al., SUN Database, CVPR 2010",
          lambda: Task("sun397", names.SUN397, prompts.SUN397, loaders.load_sun397)),
    _task("svhn", "Street View House Numbers: digits", "Netzer et al., Reading Digits in Natural Images, NeurIPS "
          "Workshops 2011", lambda: Task("svhn", names.SVHN, prompts.SVHN, loaders.load_svhn)),
    _task("imagenet", "ImageNet-1k: 1,000 classes", "Deng et al., ImageNet, CVPR 2009",
          lambda: Task("imagenet", names.imagenet(), prompts.imagenet(), image_folders.load_imagenet)),
    _task("imagenet-v2", "ImageNetV2: a new test set for ImageNet's classes", "Recht et al., Do ImageNet Classifiers "
          "Generalize to ImageNet?, ICML 2019", lambda: imagenet_like("imagenet-v2", load_imagenet_v2)),
    _task("imagenet-sketch", "ImageNet-Sketch: sketches of ImageNet's classes", "Wang et al., Learning Robust "
          "Global Representations by Penalizing Local Predictive Power, NeurIPS 2019",
          lambda: imagenet_like("imagenet-sketch", load_imagenet_sketch)),
    _task("imagenet-r", "ImageNet-R: renditions of 200 ImageNet classes", "Hendrycks et al., The Many Faces of "
          "Robustness, ICCV 2021", lambda: imagenet_subset("r", load_imagenet_r)),
    _task("imagenet-a", "ImageNet-A: natural adversarial examples of 200 classes", "Hendrycks et al., Natural "
          "Adversarial Examples, CVPR 2021", lambda: imagenet_subset("a", load_imagenet_a)),
    _task("objectnet", "ObjectNet: 113 classes mapped to ImageNet's", "Barbu et al., ObjectNet, NeurIPS 2019",
          objectnet),
    _task("food101", "Food-101: 101 dishes", "Bossard et al., Food-101, ECCV 2014",
          lambda: Task("food101", names.FOOD101, prompts.FOOD101, loaders.load_food101)),
    _task("cifar10", "CIFAR-10", "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
          lambda: Task("cifar10", names.CIFAR10, prompts.CIFAR10, loaders.load_cifar10)),
    _task("cifar100", "CIFAR-100", "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
          lambda: Task("cifar100", names.CIFAR100, prompts.CIFAR100, loaders.load_cifar100)),
    _task("stl10", "STL-10: 10 classes at 96 px", "Coates et al., An Analysis of Single-Layer Networks in "
          "Unsupervised Feature Learning, AISTATS 2011",
          lambda: Task("stl10", names.STL10, prompts.STL10, loaders.load_stl10)),
    _task("fashion-mnist", "Fashion-MNIST: 10 kinds of clothing", "Xiao et al., Fashion-MNIST, arXiv:1708.07747, "
          "2017", lambda: Task("fashion-mnist", names.FASHION_MNIST, prompts.FASHION_MNIST, load_fashion_mnist)),
    _task("digits", "handwritten digits at 8x8 (bundled with scikit-learn, offline)", "Alpaydin and Kaynak, Optical "
          "Recognition of Handwritten Digits, UCI 1998",
          lambda: Task("digits", names.DIGITS, prompts.DIGITS, load_digits, parts=DIGITS_PARTS)),
    _task("printed-digits", "digits printed in the fonts matplotlib bundles (offline)", _MINE,
          lambda: Task("printed-digits", names.DIGITS, prompts.PRINTED_DIGITS, load_printed_digits)),
    _task("typographic-digits", "handwritten digits beside a printed wrong digit (a typographic attack, offline)",
          f"{_MINE}, after PAINT's typographic attack (Ilharco et al., NeurIPS 2022)",
          lambda: Task("typographic-digits", names.DIGITS, prompts.DIGITS, load_typographic_digits)),
    *(_task(name, "drawn offline from seeds, item by item", _MINE, factory)
      for name, factory in RENDERED_TASKS.items()),
])


USER_DATASETS: dict[str, tuple[Callable[[Spec, str], Task], tuple[str, ...]]] = {
    "folder": (folder_task, ()),
    "csv": (csv_files.csv_task, csv_files.OPTIONS),
    "wds": (shards.shard_task, shards.OPTIONS),
}


def known_tasks() -> list[str]:
    """The registered task names (a user's dataset, folder:PATH, csv:PATH or wds:PATH, is accepted besides these)."""
    return sorted(TASKS)


def get_task(name: str, task_name_: str | None = None) -> Task:
    """The task called `name` (case-insensitive, "_" read as "-"), or a user's dataset: "[NAME=]folder:PATH",
    "csv:PATH", "wds:PATH" (see user_data), named `task_name_` when given."""
    spec = user_dataset(name)
    if spec is not None:
        make, _ = USER_DATASETS[spec.kind]
        return make(spec, task_name(spec, task_name_, TASKS))
    entry = TASKS.get(name.strip().lower().replace("_", "-"))
    if entry is None:
        near = did_you_mean(name.strip().lower().replace("_", "-"), known_tasks())
        listed = f"{near} (`patcher tasks` lists all)" if near else f"known tasks: {', '.join(known_tasks())}"
        raise PatcherError(f"unknown task {name!r}; {listed}, or a dataset of your own: {SPEC_HELP}")
    return entry.builds()


def user_dataset(name: str) -> Spec | None:
    """The parsed spec when `name` is a user's dataset, else None."""
    return parse_spec(name, {kind: options for kind, (_, options) in USER_DATASETS.items()})


def short_name(name: str) -> str:
    """The name a task will have, without reading its data: `shapes` for "folder:/data/shapes"."""
    spec = user_dataset(name)
    return task_name(spec, None, TASKS) if spec is not None else name.strip().lower().replace("_", "-")


def task_of(name: str, source: str | None) -> Task:
    """A run's task from its manifest: the user's dataset at `source` named `name`, or the registered `name`."""
    return get_task(source, name) if source else get_task(name)
