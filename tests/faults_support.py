"""Helpers for the fault tests: the real CLI in a subprocess, killing it, and checking what it left on disk."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.runs.manifest import load_run
from patcher.triton.serving.processes import group_pids

# A build small enough to run many times: random-weight patcher-tiny, the bundled digits, one process.
BUILD = ["build", "--task", "digits", "--model", "patcher-tiny", "--pretrained", "none", "--steps", "40",
         "--batch-size", "8", "--warmup-steps", "2", "--checkpoint-every", "5", "--device", "cpu", "--workers", "0",
         "--seed", "3"]
WEIGHTS = ("models/zeroshot.safetensors", "models/finetuned.safetensors", "models/patched.safetensors")


def environment() -> dict[str, str]:
    """The test session's environment (its PATCHER_CACHE included), offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # torch threads as in this process


def command(*arguments: str) -> list[str]:
    """The argv of `python -m patcher ARGUMENTS`."""
    return [sys.executable, "-m", "patcher", *arguments]


def run_cli(*arguments: str, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess:
    """Run the real CLI to the end."""
    return subprocess.run(command(*arguments), capture_output=True, text=True, timeout=timeout, env=environment(),
                          **kwargs)  # type: ignore[call-overload]


def start_cli(*arguments: str, **kwargs: object) -> subprocess.Popen:
    """Start the real CLI in its own process group (so kill -9 reaches any worker it forks)."""
    return subprocess.Popen(command(*arguments), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=environment(), start_new_session=True, **kwargs)  # type: ignore[call-overload]


def kill9(process: subprocess.Popen) -> None:
    """SIGKILL the process group, reap it, and wait until every process of the group is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    wait_for(lambda: not group_pids(process.pid), timeout=30)


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    """Poll until `condition()`; the seconds it took. AssertionError on timeout."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.perf_counter() - started


_ZYGOTE = r"""
import json, os, signal, sys, tempfile, traceback
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import patcher.cli.make, patcher.cli.ship  # noqa: E401 - what `patcher` imports, paid once
from patcher.cli.app import main
import patcher.stages.export, patcher.stages.build  # noqa: E401 - what its commands import lazily
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
for line in sys.stdin:
    request = json.loads(line)
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.close(ready_read)
        os.write(ready_write, b"1")  # the pid is now a process group: killpg(pid) reaches it
        os.close(ready_write)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # never the requests meant for this process
        os.dup2(os.open(request.get("stdout") or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        if request.get("env") is not None:
            os.environ.clear()
            os.environ.update(request["env"])
            tempfile.tempdir = None  # read TMPDIR again
        if request.get("cwd"):
            os.chdir(request["cwd"])
        sys.argv = ["patcher", *request["argv"]]
        code = 1
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException:
            traceback.print_exc()
        sys.stderr.flush()
        with open(request["status"], "w") as status:
            status.write(str(code))
        os._exit(code)
    os.close(ready_write)
    os.read(ready_read, 1)
    os.close(ready_read)
    print(pid, flush=True)
"""


class ForkedCLI:
    """Runs of the real CLI (`patcher.cli.app.main`, each in its own process, killable with kill -9) forked from a
    process that has imported patcher once: the ~5 s of imports are not paid for every one of many runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=environment())

    def start(self, *arguments: str, env: dict[str, str] | None = None, cwd: Path | str | None = None) -> ForkedRun:
        """Fork a run of `patcher ARGUMENTS` (with `env` as its whole environment and `cwd` its folder if given)."""
        self.count += 1
        stem = self.folder / str(self.count)
        stderr, status = stem.with_suffix(".stderr"), stem.with_suffix(".status")
        assert self.zygote.stdin is not None and self.zygote.stdout is not None
        self.zygote.stdin.write(json.dumps({"argv": list(arguments), "stderr": str(stderr), "status": str(status),
                                            "stdout": str(stem.with_suffix(".stdout")), "env": env,
                                            "cwd": None if cwd is None else str(cwd)}) + "\n")
        self.zygote.stdin.flush()
        return ForkedRun(int(self.zygote.stdout.readline()), stderr, status)

    def run(self, *arguments: str, timeout: float = 300) -> tuple[int, str]:
        """Run `patcher ARGUMENTS` to the end: (exit code, stderr)."""
        done = self.completed(*arguments, timeout=timeout)
        return done.returncode, done.stderr

    def completed(self, *arguments: str, timeout: float = 300, env: dict[str, str] | None = None,
                  cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        """Run `patcher ARGUMENTS` to the end, answered as `subprocess.run(..., capture_output=True, text=True)`
        would; TimeoutExpired (the run killed) past `timeout`."""
        child = self.start(*arguments, env=env, cwd=cwd)
        try:
            wait_for(lambda: child.poll() is not None, timeout, interval=0.01)
        except AssertionError:
            child.kill9()
            raise subprocess.TimeoutExpired(command(*arguments), timeout) from None
        return subprocess.CompletedProcess(command(*arguments), int(child.poll()),  # type: ignore[arg-type]
                                           child.stdout(), child.stderr())

    def close(self) -> None:
        """Stop the forking process."""
        self.zygote.kill()
        self.zygote.wait(timeout=30)


class ForkedRun:
    """One forked CLI run: its pid, where its stderr and exit code land."""

    def __init__(self, pid: int, stderr_path: Path, status_path: Path) -> None:
        self.pid, self.stderr_path, self.status_path = pid, stderr_path, status_path

    def poll(self) -> int | None:
        """The exit code (-9 when killed), None while it runs."""
        if self.status_path.exists() and self.status_path.read_text():
            return int(self.status_path.read_text())
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return int(self.status_path.read_text()) if self.status_path.exists() else -signal.SIGKILL
        return None

    def kill9(self) -> None:
        """SIGKILL its process group and wait until every process of it is gone (a dying worker still holds the
        locks it inherited)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        wait_for(lambda: self.poll() is not None and not group_pids(self.pid), timeout=30)

    def stderr(self) -> str:
        """What it wrote to stderr."""
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        """What it wrote to stdout (nothing for a run started without a stdout file)."""
        path = self.stderr_path.with_suffix(".stdout")
        return path.read_text() if path.exists() else ""


_SHARED: ForkedCLI | None = None


def _close(forked: ForkedCLI) -> None:
    forked.close()
    shutil.rmtree(forked.folder, ignore_errors=True)


def run_patcher(*arguments: str, timeout: float = 300, env: dict[str, str] | None = None,
                cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """`python -m patcher ARGUMENTS` to the end, as `subprocess.run(..., capture_output=True, text=True)` answers,
    forked from one process per test worker that imported patcher once (about 7 s of imports saved a run). The
    environment is this process's at the call (`environment()`) unless `env` is given. A test about a fresh
    interpreter (what it imports, its hash seed) starts one with subprocess instead."""
    global _SHARED
    if _SHARED is None or _SHARED.zygote.poll() is not None:
        _SHARED = ForkedCLI(Path(tempfile.mkdtemp(prefix="patcher-cli-")))
        atexit.register(_close, _SHARED)
    return _SHARED.completed(*arguments, timeout=timeout, env=environment() if env is None else env, cwd=cwd)


def the_error_line(stderr: str) -> str:
    """The one `error:` line a failed command printed; AssertionError on a traceback or several errors."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def hidden(parent: Path) -> list[str]:
    """Names of hidden entries in `parent` (staging, partial, lock files)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) if parent.is_dir() else []


def assert_complete_run(path: Path) -> dict[str, str]:
    """A run directory every file of which matches its manifest; returns {file: sha256}."""
    run = load_run(path)
    files = to_json(run.manifest.files)
    assert set(WEIGHTS) <= set(files)
    for relative in files:
        run.verified_file(relative)
    return {relative: record["sha256"] for relative, record in files.items()}


def assert_complete_export(path: Path) -> dict[str, str]:
    """An export directory whose export.json names intact ONNX files; returns {file: sha256}."""
    record = json.loads((path / "export.json").read_text())
    hashes = {}
    for entry in record["models"].values():
        assert sha256_file(path / entry["file"]) == entry["sha256"]
        hashes[entry["file"]] = entry["sha256"]
    assert set(hashes) >= {"patched.onnx", "zeroshot.onnx"}
    text = record.get("text")
    if text is not None:  # the text tower and the tokenizer's vocabulary
        files = {m["file"]: m["sha256"] for m in text["models"].values()}
        files[text["tokenizer"]["vocabulary"]] = text["tokenizer"]["vocabulary_sha256"]
        for file, digest in files.items():
            assert sha256_file(path / file) == digest
        hashes.update(files)
    return hashes


class SmallFilesystem:
    """A real filesystem of `size` bytes at `folder`: a tmpfs mounted there when this process may mount (root),
    otherwise a file-size limit (RLIMIT_FSIZE) that the CLI processes it starts run under."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        folder.mkdir(parents=True, exist_ok=True)
        self.mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0

    @property
    def fault(self) -> str:
        """The words of the error a write past the limit gets."""
        return "no space left on device" if self.mounted else "file too large"

    def limit(self) -> None:
        """preexec_fn for a child process: the file-size limit when no tmpfs could be mounted."""
        if not self.mounted:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.size))

    def grow(self, size: int) -> None:
        """Make room: remount the tmpfs bigger (or raise the limit for later children)."""
        self.size = size
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)], check=True)

    def remove(self) -> None:
        """Unmount the tmpfs."""
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], check=False)
            if os.path.ismount(self.folder):
                subprocess.run(["umount", "-l", str(self.folder)], check=False)


def everything(folder: Path) -> list[str]:
    """Every entry under `folder`, hidden ones included, relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class ArrayImages:
    """Images from a uint8 array [N, H, W, 3] with labels `i % 10`, optionally slow: the fingerprint sees only the
    array, so a slow and a fast instance over the same array share one cached store."""

    def __init__(self, data: np.ndarray, delay_s: float = 0.0) -> None:
        self.data, self.delay_s = data, delay_s

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        time.sleep(self.delay_s)
        return Image.fromarray(self.data[index]), index % 10


def random_images(count: int, size: int = 32) -> np.ndarray:
    """A fixed random uint8 array of `count` RGB images."""
    return np.random.default_rng(1).integers(0, 255, (count, size, size, 3), dtype=np.uint8)
