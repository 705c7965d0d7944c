"""Where the tritonserver bundled in nvidia-pytriton lives, and the environment its python backend needs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from patcher.base.errors import PatcherError

INSTALL_HINT = (
    "install it with `pip install nvidia-pytriton==0.7.0` (it bundles tritonserver), or run NVIDIA's container: "
    "docker run --gpus all -p8000-8002:8000-8002 -v $PWD/runs/triton_models:/models "
    "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models"
)


# glibc's malloc otherwise keeps the buffers of a burst of large requests (its mmap threshold grows to 32 MB after
# the first large free): fixed thresholds give them back to the system when they are freed
# and one arena (measured: 3 requests of 40 MB left tritonserver 70 MB larger with two arenas, 4 MB with one)
MALLOC_MMAP_THRESHOLD = 64 << 10
MALLOC_TRIM_THRESHOLD = 128 << 10
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
                      "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD), "MALLOC_ARENA_MAX": "1"}
OPEN_FILES_WANTED = 4096  # tritonserver holds ~70 files with 9 models, plus one per client connection
OPEN_FILES_NEEDED = 256


@dataclass(frozen=True)
class TritonInstall:
    """Where the bundled server's pieces live inside the nvidia-pytriton wheel."""

    binary: Path
    backends: Path
    stub: Path
    libs: Path
    caches: Path


def find_tritonserver() -> TritonInstall:
    """Locate the tritonserver binary, backends and python stub of nvidia-pytriton; PatcherError if absent."""
    try:
        import pytriton
    except ImportError:
        raise PatcherError(f"tritonserver not found (nvidia-pytriton is not installed): {INSTALL_HINT}") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs",
        caches=root / "caches",
    )
    for path in (install.binary, install.backends, install.stub):
        if not path.exists():
            raise PatcherError(f"{path} is missing (nvidia-pytriton incomplete or for another Python): {INSTALL_HINT}")
    return install


def prepare_backends(install: TritonInstall, workdir: Path) -> Path:
    """A backend directory in `workdir`: the bundle's backends with this Python's stub in `python/`."""
    backends = Path(workdir) / "backends"
    shutil.copytree(install.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, backends / "python" / "triton_python_backend_stub")
    return backends


def server_environment(install: TritonInstall) -> dict[str, str]:
    """This process's environment with the bundle's libraries and this Python (the stub finds packages via python3)."""
    env = dict(os.environ)
    libs = [str(install.libs), str(sysconfig.get_config_var("LIBDIR") or "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("PYTHONNOUSERSITE", "1")
    for key, value in MALLOC_ENVIRONMENT.items():
        env.setdefault(key, value)
    return env


def ensure_open_files() -> int:
    """Raise this process's soft open-file limit towards OPEN_FILES_WANTED (tritonserver inherits it); PatcherError
    when the hard limit leaves fewer than OPEN_FILES_NEEDED. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        soft = ceiling
    if soft != resource.RLIM_INFINITY and soft < OPEN_FILES_NEEDED:
        raise PatcherError(f"the open-file limit is {soft} (ulimit -n): tritonserver needs about 70 files for a "
                           f"repository of 9 models, plus one per client connection: raise it to at least "
                           f"{OPEN_FILES_NEEDED} (e.g. `ulimit -n {OPEN_FILES_WANTED}`) and start again")
    return int(soft)


def give_back_large_buffers() -> None:
    """In this process, what MALLOC_ENVIRONMENT does for tritonserver: large buffers go back to the system when
    freed."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)


def trim_free_memory() -> None:
    """Give the free pages of every malloc arena of this process back to the system (glibc's malloc_trim)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
