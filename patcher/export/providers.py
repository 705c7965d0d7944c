"""onnxruntime execution providers for a device: CPU, CUDA (onnxruntime-gpu), TensorRT where its libraries load.

    session = open_session(path, "cuda", tensorrt={})     # TensorRT, then CUDA, then CPU for what they lack
    active_provider(session)                              # what onnxruntime actually chose

onnxruntime falls back to the next provider silently when one cannot start (TensorRT without libnvinfer, CUDA
without cuDNN), so a caller that reports figures reads `active_provider` instead of trusting what it asked for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_HINT = "install onnxruntime-gpu in place of onnxruntime (bench/README.md, 'GPU check')"
_preloaded = False


def _preload_cuda_libraries(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries onnxruntime-gpu needs from the pip packages (nvidia-*) that carry them."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    with contextlib.suppress(Exception):  # libraries on LD_LIBRARY_PATH do as well; a session that cannot start says so
        ort.preload_dlls()


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has (not all of them may start)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def execution_providers(device: str = "cpu", tensorrt: dict[str, Any] | None = None, tf32: bool = True
                        ) -> list[Any]:
    """The provider list for `device` ("cpu", "cuda", "cuda:N"): TensorRT first when `tensorrt` gives its options
    (`trt_profile_*_shapes` build one engine for a batch range), then CUDA, then CPU; `tf32` False keeps CUDA's
    float32 matrix products exact float32 (parity); PatcherError without a CUDA build."""
    if not device.startswith("cuda"):
        return [CPU]
    import onnxruntime as ort

    _preload_cuda_libraries(ort)
    available = ort.get_available_providers()
    if CUDA not in available:
        raise PatcherError(f"this onnxruntime has no {CUDA} (it has {', '.join(available)}): {GPU_HINT}")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    providers: list[Any] = [(CUDA, {"device_id": index, "use_tf32": int(tf32)}), CPU]
    if tensorrt is not None:
        if TENSORRT not in available:
            raise PatcherError(f"this onnxruntime has no {TENSORRT}: install onnxruntime-gpu and TensorRT's "
                               "libraries (pip install tensorrt-cu12)")
        providers.insert(0, (TENSORRT, {"device_id": index, **tensorrt}))
    return providers


def open_session(path: Path, device: str = "cpu", threads: int = 0, tensorrt: dict[str, Any] | None = None,
                 tf32: bool = True) -> Any:
    """An onnxruntime InferenceSession of `path` on `device` (threads: CPU intra-op threads, 0 its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=execution_providers(device, tensorrt, tf32))


def active_provider(session: Any) -> str:
    """The provider that runs the session's graph (the first one onnxruntime kept)."""
    return str(session.get_providers()[0])
