"""Published CLIP prompt templates: format strings with exactly one "{}" for the class name.

Sources: OpenAI CLIP's data/prompts.md and task_vectors' src/datasets/templates.py (the same lists);
ImageNet's 80 templates come from open_clip (`OPENAI_IMAGENET_TEMPLATES`), imported when first asked for.
Fashion-MNIST and digits have no published CLIP prompts; theirs follow the same style.
"""

from __future__ import annotations

from patcher.data.tasks.classnames import open_clip_metadata

OBJECT_PHOTO = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
CIFAR10 = OBJECT_PHOTO
CIFAR100 = OBJECT_PHOTO

STL10 = ("a photo of a {}.", "a photo of the {}.")
SUN397 = ("a photo of a {}.", "a photo of the {}.")

CARS = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

DTD = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
)

EUROSAT = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)

GTSRB = (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)

KITTI = ("{}",)

MNIST = ('a photo of the number: "{}".',)
SVHN = ('a photo of the number: "{}".',)

RESISC45 = (
    "satellite imagery of {}.",
    "aerial imagery of {}.",
    "satellite photo of {}.",
    "aerial photo of {}.",
    "satellite view of {}.",
    "aerial view of {}.",
    "satellite imagery of a {}.",
    "aerial imagery of a {}.",
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    "satellite view of a {}.",
    "aerial view of a {}.",
    "satellite imagery of the {}.",
    "aerial imagery of the {}.",
    "satellite photo of the {}.",
    "aerial photo of the {}.",
    "satellite view of the {}.",
    "aerial view of the {}.",
)

FOOD101 = ("a photo of {}, a type of food.",)

FASHION_MNIST = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale photo of a {}, a type of clothing.",
    "a product photo of a {}.",
)

# 8x8 scans of handwritten digits: MNIST's template first, then two in the same style.
DIGITS = (
    'a photo of the number: "{}".',
    'a low resolution photo of the number: "{}".',
    'a pixelated photo of the number: "{}".',
)

# digits rendered from fonts (the reference model's pretraining captions): the same style, printed.
PRINTED_DIGITS = (
    'a photo of the number: "{}".',
    'a photo of the printed number: "{}".',
    'a typeset photo of the number: "{}".',
)

FOLDER_DEFAULT = ("a photo of a {}.",)


def imagenet() -> tuple[str, ...]:
    """OpenAI's 80 ImageNet templates from open_clip, as format strings."""
    return tuple(template("{}") for template in open_clip_metadata().OPENAI_IMAGENET_TEMPLATES)
