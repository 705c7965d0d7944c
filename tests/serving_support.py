"""Helpers for the serving tests: `patcher serve` in a subprocess, hostile images, and what NVIDIA's clients do."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from faults_support import run_patcher
from PIL import Image

from patcher.triton.serving.access import ServerKey, read_key_file
from patcher.triton.serving.ports import distinct_free_ports
from patcher.triton.serving.processes import Stub, stub_processes


def png(width: int, height: int, channels: int = 1) -> bytes:
    """A real PNG of width x height black pixels (8-bit grey or RGB), compressed row by row: a decompression bomb
    of a few KB when it is large."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + width * channels)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    """An image's bytes in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


class Served:
    """`python -m patcher serve` on a repository, on free ports, its output collected line by line."""

    def __init__(self, repo: Path, key_file: Path, timeout_s: float = 180, log: Path | None = None,
                 models: list[str] | None = None, grpc_front: str = "auto") -> None:
        self.repo, self.key_file, self.log = repo, key_file, log
        self.http_port, self.grpc_port, self.metrics_port = distinct_free_ports(3)
        command = [sys.executable, "-m", "patcher", "serve", "--repo", str(repo), "--key-file", str(key_file),
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                   "--metrics-port", str(self.metrics_port), *(["--log", str(log)] if log else []),
                   *(["--models", ",".join(models)] if models else []), "--grpc-front", grpc_front]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for_line("Ctrl-C stops it", timeout_s)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout_s: float) -> str:
        """The first output line containing `text`; AssertionError (with the output) after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} from patcher serve:\n" + "\n".join(self.lines[-40:]))

    @property
    def grpc_url(self) -> str:
        """host:port of its gRPC endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port of its HTTP endpoint."""
        return f"127.0.0.1:{self.http_port}"

    def key(self) -> ServerKey:
        """The key `patcher serve` wrote."""
        return read_key_file(self.key_file)

    def server_pid(self) -> int:
        """The tritonserver process it started (its child, leader of its own process group)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid and b"tritonserver" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
        raise AssertionError("patcher serve has no tritonserver child")

    def stubs(self) -> list[Stub]:
        """The python-backend stub processes of its server."""
        return stub_processes(self.server_pid())

    def stub(self, model: str) -> Stub:
        """The one stub of `model`."""
        (found,) = [s for s in self.stubs() if s.model == model]
        return found

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        return int(self.process.returncode)


class Load:
    """Closed-loop requests from `threads` threads until stopped: a bounded load; counts every answer."""

    def __init__(self, request: Callable[[Any], None], make_client: Callable[[], Any], threads: int = 2) -> None:
        self.request, self.make_client = request, make_client
        self.succeeded = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        client = self.make_client()
        try:
            while not self._stop.is_set():
                try:
                    self.request(client)
                except Exception as error:  # every failure counts, whatever its type
                    with self._lock:
                        self.failures.append(f"{type(error).__name__}: {error}")
                    continue
                with self._lock:
                    self.succeeded += 1
        finally:
            client.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


# --- what NVIDIA's example clients (triton-inference-server/client, src/python/examples) rely on -------------


def image_client_parse(metadata: Any, config: Any) -> tuple[int, str, str, int, int, int, int, str]:
    """image_client.py's parse_model, with the same checks: (max_batch, input, output, c, h, w, format, dtype)."""
    from tritonclient.grpc import model_config_pb2 as mc

    assert len(metadata.inputs) == 1, f"expecting 1 input, got {len(metadata.inputs)}"
    assert len(metadata.outputs) == 1, f"expecting 1 output, got {len(metadata.outputs)}"
    assert len(config.input) == 1, f"expecting 1 input in model configuration, got {len(config.input)}"
    tensor, output = metadata.inputs[0], metadata.outputs[0]
    assert output.datatype == "FP32", f"expecting output datatype to be FP32, got {output.datatype}"
    batched = config.max_batch_size > 0
    assert sum(1 for d in output.shape[1 if batched else 0 :] if d > 1) <= 1, "expecting model output to be a vector"
    assert len(tensor.shape) == 3 + batched, f"expecting input to have {3 + batched} dimensions"
    fmt = config.input[0].format
    assert fmt in (mc.ModelInput.FORMAT_NCHW, mc.ModelInput.FORMAT_NHWC), f"unexpected input format {fmt}"
    offset = 1 if batched else 0
    if fmt == mc.ModelInput.FORMAT_NHWC:
        h, w, c = tensor.shape[offset : offset + 3]
    else:
        c, h, w = tensor.shape[offset : offset + 3]
    return config.max_batch_size, tensor.name, output.name, c, h, w, fmt, tensor.datatype


def image_client_preprocess(image: Image.Image, fmt: int, c: int, h: int, w: int) -> np.ndarray:
    """image_client.py's preprocess with `-s NONE`: RGB (or L), PIL bilinear resize to w x h, raw 0-255 floats."""
    from tritonclient.grpc import model_config_pb2 as mc

    resized = np.array((image.convert("L") if c == 1 else image.convert("RGB")).resize((w, h), Image.BILINEAR))
    if resized.ndim == 2:
        resized = resized[:, :, np.newaxis]
    typed = resized.astype(np.float32)
    return np.transpose(typed, (2, 0, 1)) if fmt == mc.ModelInput.FORMAT_NCHW else typed


def classification_fields(entry: Any) -> tuple[float, int, str]:
    """What the example clients print for one classification result: (score, index, label), asserting 3 fields."""
    text = "".join(chr(x) for x in entry) if not isinstance(entry, (bytes, str)) else (
        entry.decode() if isinstance(entry, bytes) else entry)
    fields = text.split(":")
    assert len(fields) == 3, f"expected score:index:label, got {text!r} (is the output labelled?)"
    return float(fields[0]), int(fields[1]), fields[2]


def environment() -> dict[str, str]:
    """This process's environment (PATCHER_CACHE included) for CLI subprocesses."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


# --- code a hostile client uploads ---------------------------------------------------------------------------


EVIL_CONFIG = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                          "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
                          "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]})


def evil_code(marker: Path) -> bytes:
    """A python-backend model.py that writes `marker` when the server imports it."""
    return (f"open({str(marker)!r}, 'w').write('ran')\n"
            "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n").encode()


# --- exports, repositories and versions ------------------------------------------------------------------------


def export_record(export: Path) -> dict[str, Any]:
    """An export's export.json."""
    return json.loads((export / "export.json").read_text())


def reference_logits(export: Path, batch: np.ndarray, task: str) -> np.ndarray:
    """Logits of the exported patched graph for raw-pixel batches normalised as CLIP does."""
    import onnxruntime as ort

    record = export_record(export)
    mean = np.asarray(record["preprocess"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(record["preprocess"]["std"], np.float32).reshape(1, 3, 1, 1)
    session = ort.InferenceSession(str(export / "patched.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run([record["tasks"][task]["output"]], {"image": ((batch / 255.0 - mean) / std)})
    return logits


def variant(export: Path, folder: Path, swap: bool = False, labels: str | None = None) -> Path:
    """Another export with the same graphs: patched and zero-shot exchanged, or the digits' class names renamed."""
    shutil.copytree(export, folder)
    data = export_record(folder)
    if swap:
        data["models"]["patched"], data["models"]["zeroshot"] = data["models"]["zeroshot"], data["models"]["patched"]
    if labels:
        data["tasks"]["digits"]["classnames"] = [labels.format(name) for name in data["tasks"]["digits"]["classnames"]]
    (folder / "export.json").write_text(json.dumps(data, indent=2))
    return folder


def patcher_triton(export: Path, repo: Path, *options: str) -> str:
    """Run the real `patcher triton EXPORT --repo REPO OPTIONS`; its output (AssertionError if it fails)."""
    done = run_patcher("triton", str(export), "--repo", str(repo), *options, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def entry_models(export: Path, name: str = "digits") -> list[str]:
    """The model names of an export's entry."""
    from patcher.triton.repository.entry import Entry

    record = export_record(export)
    return [m.name for m in Entry(name, tuple(record["tasks"]), open_vocabulary="text" in record).models()]


def served_versions(client: Any, models: list[str]) -> list[list[str]]:
    """The versions the server serves of each model."""
    return [list(client.get_model_metadata(model).versions) for model in models]


def wait_for_version(client: Any, models: list[str], version: str, timeout_s: float) -> float:
    """Seconds until every model serves only `version`; AssertionError after timeout_s."""
    started = time.monotonic()
    while served_versions(client, models) != [[version]] * len(models):
        assert time.monotonic() - started < timeout_s, served_versions(client, models)
        time.sleep(0.2)
    return time.monotonic() - started


def half_publish(repo: Path, export: Path, scratch: Path, options: dict[str, Any]) -> Any:
    """The state a `patcher triton` killed after its first rename leaves: journal "publishing", one model's new
    version in place, the others' staged. Made by writing the same update into a copy of the repository, then
    moving its pieces, holding the publish lock as a writer does (the watcher may be loading meanwhile)."""
    from patcher.triton.repository.publish import (
        JOURNAL,
        MODEL_DIR,
        STAGING_PREFIX,
        VERSION_DIR,
        Journal,
        publish_lock,
        read_journal,
    )
    from patcher.triton.repository.writer import RepositoryOptions, write_repository

    shutil.copytree(repo, scratch)
    written = write_repository(export, scratch, RepositoryOptions(**options))
    version, models = written.version, list(written.models)
    staging = repo / f"{STAGING_PREFIX}killed"
    with publish_lock(repo):
        for index, model in enumerate(models):
            shutil.move(scratch / model / str(version), scratch / f"{model}.version")
            files = [p for p in (scratch / model).rglob("*")  # config, labels and warmup/ files; no old versions
                     if p.is_file() and not p.relative_to(scratch / model).parts[0].isdigit()]
            target = repo / model if index == 0 else staging / model / MODEL_DIR
            if index == 0:
                shutil.move(scratch / f"{model}.version", repo / model / str(version))
            else:
                target.mkdir(parents=True)
                shutil.move(scratch / f"{model}.version", staging / model / VERSION_DIR)
            for path in files:
                destination = target / path.relative_to(scratch / model)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)
        journal = Journal(serial=read_journal(repo).serial + 1, state="publishing", entry=written.name,
                          version=version, models=dict.fromkeys(models, version), staging=staging.name)
        (repo / JOURNAL).write_text(json.dumps(journal.record()))
    return journal


# --- hostile load ------------------------------------------------------------------------------------------------


# 0.5 to 8 ms, 1 ms among them: Triton's race needs an answer that arrives just as the deadline passes, and when that
# is depends on the model's speed and the machine's load (1 ms alone killed the server on a loaded machine only)
DEADLINES_S = (0.0005, 0.0007, 0.001, 0.0014, 0.002, 0.0028, 0.004, 0.0056, 0.008)


def deadline_burst(url: str, models: list[str], seconds: float, blob: bytes, results: Any) -> None:
    """One hostile client (run it in its own process): requests of `blob` to every model in turn, one at a time,
    with deadlines of DEADLINES_S in turn, for `seconds`; puts (requests sent, {status: count}) on `results`."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[blob]], dtype=np.object_))
    sent, statuses = 0, {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for model in models:
            try:
                client.infer(model, [tensor], client_timeout=DEADLINES_S[sent % len(DEADLINES_S)])
                status = "OK"
            except InferenceServerException as error:
                status = str(error.status())
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1
    results.put((sent, statuses))


def hostile_clients(url: str, models: list[str], seconds: float, blob: bytes, count: int = 3) -> Any:
    """`count` deadline_burst processes (spawned: no gRPC state inherited), started; join them with `gather`."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=deadline_burst, args=(url, models, seconds, blob, results))
                 for _ in range(count)]
    for process in processes:
        process.start()
    return processes, results


def gather(processes: list[Any], results: Any, timeout_s: float = 120) -> list[tuple[int, dict[str, int]]]:
    """What each hostile client sent, once all have finished."""
    gathered = [results.get(timeout=timeout_s) for _ in processes]
    for process in processes:
        process.join(timeout=timeout_s)
    return gathered


def group_pss_mb(pids: list[int]) -> float:
    """Proportional set size of processes together, in MB (shared memory counted once across them)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total / 1024


def owned_scratch(prefix: str, pid: int) -> list[Path]:
    """The scratch folders (patcher/base/scratch.py) in the temporary directory that process `pid` owns."""
    import tempfile

    found = []
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if (path / ".owner.lock").read_text().strip() == str(pid):
                found.append(path)
    return found


def published_by_hand(repo: Path, *relative: str) -> None:
    """Record files changed on purpose in the repository's journal, as if `patcher triton` had published them, so
    that a test of what tritonserver does with them gets past `patcher serve`'s check of the files."""
    import hashlib

    path = repo / ".patcher-journal.json"
    journal = json.loads(path.read_text())
    for name in relative:
        journal["hashes"][name] = hashlib.sha256((repo / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(journal))
