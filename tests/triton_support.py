"""Whether the bundled tritonserver is here: developers without it skip; CI (CI=true) must have it."""

from __future__ import annotations

import os

import pytest

from patcher.base.errors import PatcherError
from patcher.triton.serving.install import find_tritonserver


def requires_bundled_triton() -> pytest.MarkDecorator:
    """Skip where nvidia-pytriton is missing, except in CI, where a missing server must fail the tests."""
    try:
        find_tritonserver()
        available = True
    except PatcherError:
        available = False
    return pytest.mark.skipif(
        not available and os.environ.get("CI") != "true", reason="nvidia-pytriton==0.7.0 is not installed"
    )
