"""Names derived from task names: ONNX tensor names, Triton model names, file names."""

from __future__ import annotations

import re


def tensor_name(task: str) -> str:
    """A task name made safe for ONNX and Triton tensor and model names (`fashion-mnist` -> `fashion_mnist`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", task)


def logits_output(task: str) -> str:
    """The name of the logits output for a task in exported graphs."""
    return f"logits_{tensor_name(task)}"
