"""Where the tritonserver bundled in nvidia-pytriton lives, and the environment its python backend needs."""

from __future__ import annotations

import os
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
    return env
