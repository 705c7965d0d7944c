"""The files of a run directory: every name a stage reads or writes, in one place (docs/contracts.md).

    RUN/manifest.json                 the record every later stage trusts (runs/manifest.py)
    RUN/timings.json                  when and how long, kept out of the manifest so that it stays reproducible
    RUN/open_clip_config.json         the architecture and preprocessing, as open_clip's `local-dir:` reads them
    RUN/models/<kind>.safetensors     the image encoder and every task's head, for each of KINDS
    RUN/text/<kind>.safetensors       the text tower, where the method trained one (finetuned, patched)
    RUN/alpha_curve.png, alpha_curve_step<k>.png, train.log
    RUN/wiseft.png                    patch-task accuracy against every other task's, over the alphas tried
    RUN/per_class_accuracy.json       every task's accuracy per class (runs/per_class.py)
    RUN/reports/                      --report-to's curves (tensorboard/ event files, wandb/), left out of the manifest
    RUN/onnx/                         `patcher export`'s default output
"""

from __future__ import annotations

# Inside a classifier file: the image encoder's tensors as `visual.*`, each task's head as `heads.<task>`; a
# state may also carry the text tower as `text.*` (models/state.py).
VISUAL_PREFIX = "visual."
TEXT_PREFIX = "text."
HEAD_PREFIX = "heads."

KINDS = ("zeroshot", "finetuned", "patched")  # the three models a run stores
TEXT_KINDS = ("finetuned", "patched")  # the models that carry their own text tower when the method trains one
EXPORTED_KINDS = ("patched", "zeroshot")  # what `patcher export` turns into ONNX

MANIFEST = "manifest.json"
TIMINGS = "timings.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
TRAIN_LOG = "train.log"
ALPHA_CURVE = "alpha_curve.png"
WISEFT_PLOT = "wiseft.png"
PER_CLASS = "per_class_accuracy.json"
CHECKPOINTS = "checkpoints"
REPORTS = "reports"
EXPORT_DIR = "onnx"


def model_file(kind: str) -> str:
    """The run-relative path of a kind's classifier (encoder and heads)."""
    return f"models/{kind}.safetensors"


def text_file(kind: str) -> str:
    """The run-relative path of a kind's text tower."""
    return f"text/{kind}.safetensors"


def alpha_curve_step(number: int) -> str:
    """The alpha plot of one step of a sequential run (numbered from 1)."""
    return f"alpha_curve_step{number}.png"
