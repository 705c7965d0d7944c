"""The GPU check: one command that sets itself up and measures patcher's CUDA paths on one GPU (bench/README.md).

    python3 bench/gpu_check.py                   # on a GPU host: .venv-gpu from the registries, then ~6 min
    python3 bench/gpu_check.py --wheels DIR      # the same from a folder of wheels (a host without a network)
    .venv/bin/python bench/gpu_check.py --cpu-smoke --out /tmp/x   # the same code paths, tiny model, seconds

Phases, each timed, each recording its error instead of ending the check (bench/gpu_phases.py): the machine;
fine-tuning ViT-B-32- and ViT-L-14-shaped open_clip models (random weights) through patcher's training loop with
AMP bf16, with and without gradient checkpointing and accumulation (images/s, torch.cuda.max_memory_allocated);
held-out evaluation; `patcher build` and `patcher export` of a ViT-B-32 run on digits and the export's parity on
the GPU (onnxruntime's CUDA provider against PyTorch on CUDA); onnxruntime's CUDA (and TensorRT, where its
libraries load) providers against PyTorch at batch 1, 64 and 256; the bundled tritonserver serving the export
with a GPU instance group (KIND_GPU). Writes bench/results/gpu-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]  # bench's modules; patcher from the working tree
VENV = ROOT / ".venv-gpu"
# what the check imports; a Python that has them all (and a GPU, or --cpu-smoke) needs no setup
NEEDED = ("patcher", "open_clip", "onnxruntime", "tritonclient.grpc", "pytriton", "torch")
# the image's own CUDA builds are kept (a venv with system site packages) instead of being replaced by the pins
SYSTEM_BUILDS = ("torch", "torchvision", "numpy")


def _has_modules(python: str, modules: tuple[str, ...]) -> bool:
    probe = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
    top = [module.split(".")[0] for module in modules]
    return subprocess.run([python, "-c", probe, *top], capture_output=True, cwd=ROOT, check=False).returncode == 0


def _has_cuda_torch(python: str, numpy_below_2: bool = False) -> bool:
    """True when `python` has a torch that sees a GPU (and, if asked, a numpy below 2, which nvidia-pytriton needs:
    the system's packages built for numpy 2 would not import beside the numpy 1 it installs)."""
    probe = ("import sys, torch, numpy; sys.exit(0 if torch.cuda.is_available() and (not int(sys.argv[1]) or "
             "int(numpy.__version__.split('.')[0]) < 2) else 1)")
    return subprocess.run([python, "-c", probe, str(int(numpy_below_2))], capture_output=True,
                          check=False).returncode == 0


def _constraints(drop: tuple[str, ...], folder: Path) -> Path:
    """constraints.txt without the packages named in `drop` (kept from the system, or replaced by a GPU build)."""
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if not re.match(rf"^({'|'.join(map(re.escape, drop))})==", line.strip())]
    path = folder / "constraints-gpu.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pin(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit(f"error: constraints.txt pins no {name}")


def set_up(arguments: argparse.Namespace) -> float:
    """Create .venv-gpu (reusing a CUDA torch the system Python has, where its numpy is below 2) and install what the
    check needs: the project with the constraints' pins, onnxruntime-gpu in place of onnxruntime, TensorRT's wheel
    if asked. Seconds taken."""
    started = time.perf_counter()
    system_cuda = _has_cuda_torch(sys.executable, numpy_below_2=True)
    python = VENV / "bin" / "python"
    if not python.exists():
        venv = [sys.executable, "-m", "venv", str(VENV)]
        subprocess.run(venv + (["--system-site-packages"] if system_cuda else []), check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    if arguments.wheels:
        pip += ["--no-index", "--find-links", str(Path(arguments.wheels).resolve())]
    VENV.mkdir(exist_ok=True)
    kept = SYSTEM_BUILDS if system_cuda else ()
    constraints = _constraints((*kept, "onnxruntime"), VENV)
    steps = [] if system_cuda else [["-c", str(constraints), f"torch=={_pin('torch')}",
                                     f"torchvision=={_pin('torchvision')}"]]  # PyPI's Linux wheels: CUDA builds
    steps += [["-c", str(constraints), "-e", f"{ROOT}[serve]"],
              [f"onnxruntime-gpu[cuda,cudnn]=={_pin('onnxruntime')}"]]
    if arguments.tensorrt_package:
        steps.append([arguments.tensorrt_package])
    for step in steps:
        print("setup: pip install " + " ".join(step), flush=True)
        if subprocess.run(pip + step, cwd=ROOT, check=False).returncode != 0:
            raise SystemExit(f"error: `pip install {' '.join(step)}` failed (above): without a registry, pass --wheels "
                             "DIR, or --no-setup to measure with this Python as it is")
        if "-e" in step:
            # onnxruntime (the CPU wheel the project depends on) and onnxruntime-gpu share one module folder
            subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "onnxruntime"], check=False)
    return time.perf_counter() - started


def _gpu_present() -> bool:
    """True when nvidia-smi finds a GPU (what decides between the GPU check and the CPU smoke run, before torch)."""
    if shutil.which("nvidia-smi") is None:
        return False
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return listed.returncode == 0 and "GPU" in listed.stdout


def _needs_setup(arguments: argparse.Namespace) -> bool:
    if arguments.no_setup or arguments.cpu_smoke or Path(sys.prefix).resolve() == VENV.resolve():
        return False
    return not (_has_modules(sys.executable, NEEDED) and _has_cuda_torch(sys.executable))


def parse() -> argparse.Namespace:
    """The check's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths on the tiny model, on CPU")
    parser.add_argument("--no-setup", action="store_true", help="use this Python as it is (missing parts skip)")
    parser.add_argument("--wheels", help="install from this folder of wheels only (no registry)")
    parser.add_argument("--tensorrt-package", help="also pip install this (e.g. tensorrt-cu12==10.13.3.9)")
    parser.add_argument("--budget", type=float, default=None, help="seconds the measurements may take in all")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--setup-seconds", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    """Set up if needed (then run again inside .venv-gpu), measure every phase, write the results."""
    arguments = parse()
    if not arguments.cpu_smoke and not _gpu_present():
        print("gpu check: no GPU here (nvidia-smi finds none): the CPU smoke run, with this Python", flush=True)
        arguments.cpu_smoke = True
    if _needs_setup(arguments):
        seconds = set_up(arguments)
        command = [str(VENV / "bin" / "python"), __file__, *sys.argv[1:], "--no-setup", f"--setup-seconds={seconds}"]
        os.execv(command[0], command)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpu_phases import run_check  # bench/gpu_phases.py: imports torch and patcher, so only after the setup

    from patcher.base.files import write_json, write_text

    report = run_check(arguments.cpu_smoke, arguments.budget, arguments.setup_seconds)
    from gpu_report import markdown

    arguments.out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{report['device_slug']}"
    write_json(arguments.out / f"{name}.json", report)
    write_text(arguments.out / f"{name}.md", markdown(report))
    print(markdown(report))
    print(f"wrote {arguments.out / name}.md and .json")
    failed = [phase for phase, record in report["phases"].items() if record.get("error")]
    if failed:
        print(f"phases with errors: {', '.join(failed)} (details in the report)", file=sys.stderr)
    sys.exit(1 if failed and arguments.cpu_smoke else 0)


if __name__ == "__main__":
    main()
