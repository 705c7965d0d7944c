"""torchvision imports on this machine's CPU torch, and the compat module stays out of the way otherwise."""

from __future__ import annotations

import subprocess
import sys


def test_torchvision_imports_and_transforms_work():
    from patcher.base.compat import import_torchvision

    torchvision = import_torchvision()
    from PIL import Image

    tensor = torchvision.transforms.ToTensor()(Image.new("RGB", (4, 4), (255, 0, 0)))
    assert tensor.shape == (3, 4, 4) and tensor[0].min() == 1.0


def test_compat_does_nothing_where_torchvision_imports_on_its_own():
    code = (
        "import importlib, sys\n"
        "try:\n"
        "    import torchvision\n"
        "    plain = True\n"
        "except RuntimeError:\n"
        "    plain = False\n"
        "from patcher.base import compat\n"
        "compat.import_torchvision()\n"
        "print(plain, compat.patched_schemas())\n"
    )
    plain, patched = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()
    # exactly one of the two holds: torchvision imported by itself, or compat had to register the schemas
    assert (plain == "True") != (patched == "True")
