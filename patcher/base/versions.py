"""The versions a result depends on (libraries and patcher), recorded in every run, export and benchmark."""

from __future__ import annotations

import sys

from patcher import __version__


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a result depends on."""
    import importlib.metadata as metadata

    versions = {"python": sys.version.split()[0]}
    for package in ("patcher", "torch", "open_clip_torch", "numpy", "onnx", "onnxruntime", "tritonclient"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def versions() -> dict[str, str]:
    """Library versions and patcher's."""
    return {**library_versions(), "patcher": __version__}
