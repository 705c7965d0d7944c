"""Make torchvision importable on CPU-only torch builds whose torchvision wheel is a CUDA build.

torchvision 0.28 from PyPI registers kernels for its C++ operators at import time; on a CPU build
of torch 2.13 the schemas of ``torchvision::nms`` and ``torchvision::qnms`` are then missing and the
import fails with ``operator torchvision::nms does not exist``. Defining those two schemas first lets
the import succeed: transforms and datasets work, the C++ ops (nms, decode_jpeg) do not, so patcher
reads images with PIL. Where torchvision imports on its own this module does nothing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_MISSING_OPS = ("nms", "qnms")
_SIGNATURE = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library = None  # the torch.library handle must stay alive for the schemas to stay registered


def import_torchvision() -> ModuleType:
    """Import torchvision, registering the missing operator schemas only if the plain import fails."""
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for op in _MISSING_OPS:
        _library.define(f"{op}{_SIGNATURE}")
    return importlib.import_module("torchvision")


def patched_schemas() -> bool:
    """True when this module had to register torchvision's operator schemas."""
    return _library is not None


def import_open_clip() -> ModuleType:
    """Import open_clip, which imports torchvision, after making torchvision importable."""
    import_torchvision()
    return importlib.import_module("open_clip")
