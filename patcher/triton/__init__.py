"""Serve an export with NVIDIA Triton: model repository writer, local server launcher, gRPC client.

    write_repository(run / "onnx", Path("runs/triton_models"))     # one entry: ensembles, classifiers, per task
    with TritonServer(Path("runs/triton_models")) as server:         # the tritonserver bundled in nvidia-pytriton
        classify_files([Path("stop.png")], "gtsrb", url=server.grpc_url)

The `python` flavour runs the ONNX graphs with onnxruntime inside Triton's python backend (the bundled
server has no onnxruntime backend); the `onnxruntime` flavour is for NVIDIA's container on a GPU host.
Either way the preprocessing model is python-backend code that needs numpy and pillow in the server's Python
(`pip install pillow` in NVIDIA's container), and the python flavour also needs onnxruntime there.
Attributes load on first use, so importing a submodule (e.g. the python-backend templates) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_REPOSITORY": "repository",
    "TritonServer": "server",
    "classify_files": "client",
    "find_tritonserver": "install",
    "load_export": "export_info",
    "read_config": "configs",
    "serve_forever": "serve",
    "write_repository": "repository",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
