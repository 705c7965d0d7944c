"""A real `patcher serve` (bundled Triton 2.51) under what production does to it: clients that give up after 1 ms,
requests of the largest size the limits allow, a second server on the same ports, SIGTERM at start-up, kill -9 of
tritonserver, and the same faults against a bare tritonserver where they break it.

One server for the module; the tests run in file order (the kill -9 test restarts it, so it comes last).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import (
    Served,
    encoded,
    environment,
    gather,
    group_pss_mb,
    hostile_clients,
    owned_scratch,
    published_by_hand,
)
from triton_support import requires_bundled_triton

from patcher.triton.repository.writer import write_repository
from patcher.triton.serving.native_front import native_front_missing
from patcher.triton.serving.processes import group_pids
from patcher.triton.serving.server import ServerSettings, TritonServer

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
BYTES_MODELS = ["digits", "digits_digits_bytes", "digits_fashion_mnist_bytes"]
BURST_S = 10
ANSWERED = 0.99
MEMORY_BOUND_MB = 1536  # tritonserver, its python stubs and patcher serve (the front) together, PSS
GIVEN_BACK_MB = 160  # above the baseline once the large requests are done: the preprocessing stub's shm pool


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hostile") / "repo"
    write_repository(tiny_export, repo)
    return repo


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    # the models the hostile clients ask, and what they compose (the front and the process are the point)
    server = Served(repo, tmp_path_factory.mktemp("keys") / "serve.key.json", models=BYTES_MODELS)
    yield server
    assert server.stop() == 0, "\n".join(server.lines[-30:])


def _hostile_png() -> bytes:
    """What the hostile clients send: a small valid image, answered in about a millisecond (the digits test images,
    larger, take longer, and the race then needs other deadlines)."""
    return encoded(Image.new("RGB", (28, 28), (10, 200, 30)))


def _digit_png() -> bytes:
    from patcher.data.tasks import get_task

    return encoded(get_task("digits").dataset("test")[0][0])


def _bytes_input(blobs: list[bytes]):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("image_bytes", [len(blobs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_).reshape(-1, 1))
    return tensor


class GoodClient:
    """A client with sensible deadlines sending one digit to `digits` over and over; counts what was answered."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.client, self.blob = grpcclient.InferenceServerClient(url), _digit_png()
        self.answered, self.failed, self.latencies = 0, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self.client.infer("digits", [_bytes_input([self.blob])], client_timeout=30)
                assert response.as_numpy("logits_digits").shape == (1, 10)
            except Exception as error:  # every failure counts
                self.failed.append(f"{type(error).__name__}: {error}")
                time.sleep(0.05)
                continue
            self.answered += 1
            self.latencies.append(time.monotonic() - started)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.client.close()


# --- clients that give up after 1 ms -------------------------------------------------------------------------------


def test_a_bare_tritonserver_dies_under_a_burst_of_1ms_deadlines(repo: Path) -> None:
    """Why the front exists: the same burst straight at Triton 2.51's gRPC port kills it (server#7368). The race
    needs an answer to arrive just as a deadline passes, so a machine may take more than one burst; one that survives
    three is skipped with what was sent (the bundled server may have the fix, and the front could go)."""
    with TritonServer(repo, models=BYTES_MODELS, settings=ServerSettings(startup_timeout_s=120)) as server:
        assert server.process is not None
        for _ in range(3):
            processes, results = hostile_clients(server.grpc_url, BYTES_MODELS, BURST_S, _hostile_png())
            sent = gather(processes, results)
            code = server.process.poll()
            if code is not None:
                break
    if code is None:
        pytest.skip(f"tritonserver survived three bursts of short deadlines on this machine ({sent})")
    assert code == -signal.SIGSEGV or code == -signal.SIGABRT, (code, sent)


def _good_requests_answered_under_a_burst(served: Served) -> None:
    """The burst at the front while a good client asks: the good client answered, tritonserver the same process."""
    pid = served.server_pid()
    with GoodClient(served.grpc_url) as good:
        time.sleep(1)
        processes, results = hostile_clients(served.grpc_url, BYTES_MODELS, BURST_S, _hostile_png())
        sent = gather(processes, results)
        time.sleep(1)
    hostile = sum(count for count, _ in sent)
    assert hostile > 1000 and all(status.get("StatusCode.DEADLINE_EXCEEDED") for _, status in sent), sent
    total = good.answered + len(good.failed)
    assert good.answered / total >= ANSWERED, (good.answered, good.failed[:3], served.lines[-15:])
    assert served.server_pid() == pid and not [line for line in served.lines if "exited unexpectedly" in line]
    print(f"\nhostile requests {hostile} ({sent}); good: {good.answered} answered of {total}, "
          f"latency median {np.median(good.latencies) * 1000:.0f} ms, max {max(good.latencies) * 1000:.0f} ms")


def test_under_a_burst_of_1ms_deadlines_good_requests_are_answered_by_the_same_server(served: Served) -> None:
    """Through the default front: the compiled one where Go and grpc-go are installed (CI installs them)."""
    front = "compiled" if native_front_missing() is None else "Python"
    assert f"(a {front} front that never passes" in served.wait_for_line("  gRPC ", 1)
    _good_requests_answered_under_a_burst(served)


def test_the_python_front_holds_under_the_same_burst(repo: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the compiled front cannot be built (here: no grpc-go where it is looked for), `patcher serve` says so
    and serves through the Python front, with the same guarantee."""
    monkeypatch.setenv("PATCHER_GOPATH", str(tmp_path / "no-gopath"))
    served = Served(repo, tmp_path / "serve.key.json", models=BYTES_MODELS)
    try:
        note = served.wait_for_line("gRPC front: the Python one", 1)
        assert "golang-google-grpc-dev" in note or "no Go toolchain" in note, note
        assert "(a Python front that never passes" in served.wait_for_line("  gRPC ", 1)
        _good_requests_answered_under_a_burst(served)
    finally:
        assert served.stop() == 0, "\n".join(served.lines[-30:])


# --- requests of the largest legal size ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The processes `pid` started (from any of its threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _largest_png() -> bytes:
    """A 6000 x 6000 RGB PNG (36 megapixels, max_pixels) of just under 16 MB (max_bytes): noise in the top rows."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((6000, 6000, 3), np.uint8)
    rows = (16 << 20) // (6000 * 3) - 40
    pixels[:rows] = rng.integers(0, 256, (rows, 6000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    assert len(buffer.getvalue()) <= 16 << 20
    return buffer.getvalue()


def test_three_requests_of_the_largest_legal_size_stay_bounded_and_memory_goes_back(served: Served) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    largest = _largest_png()
    request = [largest] * 4  # 4 x 16 MB = 64 MB (max_request_bytes), 4 x 36 = 144 megapixels (max_request_pixels)
    pids = lambda: sorted({*group_pids(served.server_pid()), served.process.pid,  # noqa: E731
                           *_children(served.process.pid)})  # the compiled gRPC front is a child of patcher serve
    time.sleep(2)
    baseline = group_pss_mb(pids())
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], group_pss_mb(pids()))
            time.sleep(0.05)

    outcomes: list[str] = []

    def send() -> None:
        client = grpcclient.InferenceServerClient(served.grpc_url)
        try:
            shape = client.infer("digits", [_bytes_input(request)], client_timeout=300).as_numpy("logits_digits").shape
            outcomes.append(f"served {shape}")
        except InferenceServerException as error:
            outcomes.append(f"refused {error.status()}: {error.message()}")
        finally:
            client.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(3)]
    try:
        started = time.monotonic()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=600)
        took = time.monotonic() - started
        time.sleep(3)
    finally:
        stop.set()
        sampler.join()
    after = group_pss_mb(pids())
    print(f"\nlargest legal requests: {outcomes} in {took:.1f} s; PSS baseline {baseline:.0f} MB, "
          f"peak {peak[0]:.0f} MB, 3 s after {after:.0f} MB")
    assert all(o.startswith(("served (4, 10)", "refused StatusCode.RESOURCE_EXHAUSTED")) for o in outcomes), outcomes
    assert outcomes.count("served (4, 10)") >= 1
    assert peak[0] < MEMORY_BOUND_MB and after < baseline + GIVEN_BACK_MB

    client = grpcclient.InferenceServerClient(served.grpc_url)
    with pytest.raises(InferenceServerException) as refused:  # one byte over what any model takes: not read at all
        client.infer("digits", [_bytes_input([bytes(65 << 20)])], client_timeout=60)
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException) as refused:  # 5 x 36 megapixels: more than a request may decode
        client.infer("digits", [_bytes_input([encoded(Image.new("L", (6000, 6000)))] * 5)], client_timeout=60)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "max_request_pixels" in refused.value.message()
    client.close()


# --- a second server, SIGTERM at start-up -----------------------------------------------------------------------------


def _serve(repo: Path, key_file: Path, *ports: int, models: str = "") -> subprocess.Popen[str]:
    http, grpc, metrics = ports
    return subprocess.Popen([sys.executable, "-m", "patcher", "serve", "--repo", str(repo), "--key-file", str(key_file),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             *(["--models", models] if models else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())


def test_a_refused_second_server_leaves_the_first_ones_key_file_alone(served: Served, repo: Path) -> None:
    from patcher.triton.serving.ports import distinct_free_ports

    key, stamp = served.key_file.read_text(), served.key_file.stat().st_mtime_ns
    same_ports = _serve(repo, served.key_file, served.http_port, served.grpc_port, served.metrics_port)
    _, err = same_ports.communicate(timeout=120)
    assert same_ports.returncode == 2 and "is in use (another server?)" in err, err
    other_ports = _serve(repo, served.key_file, *distinct_free_ports(3))  # its own ports, the first's key file
    _, err = other_ports.communicate(timeout=120)
    assert other_ports.returncode == 2 and f"is the key file of the running server pid {served.process.pid}" in err
    assert served.key_file.read_text() == key and served.key_file.stat().st_mtime_ns == stamp
    client_key = served.key()
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.grpc_url)  # the key still opens the control plane
    assert client.get_model_repository_index(headers=client_key.grpc_headers).models
    client.close()


def test_sigterm_during_start_up_stops_serve_promptly_and_leaves_nothing(repo: Path, tmp_path: Path) -> None:
    from patcher.triton.serving.ports import distinct_free_ports

    serve = _serve(repo, tmp_path / "key.json", *distinct_free_ports(3))
    deadline = time.monotonic() + 120
    while not [p for p in owned_scratch("patcher-triton-", serve.pid) if (p / "tritonserver.log").exists()]:
        assert time.monotonic() < deadline and serve.poll() is None, serve.stderr.read() if serve.stderr else ""
        time.sleep(0.05)
    (workdir,) = owned_scratch("patcher-triton-", serve.pid)
    time.sleep(0.5)  # tritonserver is loading its models now
    tritonserver = _child(serve.pid, "bin/tritonserver")
    started = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    out, err = serve.communicate(timeout=60)
    took = time.monotonic() - started
    assert serve.returncode == 0 and "SIGTERM during start-up: stopping" in out, (out, err)
    assert "Ctrl-C stops it" not in out and took < 10, took
    assert not workdir.exists() and not (tmp_path / "key.json").exists()
    assert not group_pids(tritonserver)  # tritonserver and its stubs are gone
    print(f"\nSIGTERM during start-up: serve exited in {took:.1f} s")


def _child(pid: int, command: str) -> int:
    """The child of `pid` whose command line contains `command`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                line = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if parent == pid and command in line:
                return int(entry.name)
    raise AssertionError(f"process {pid} has no child running {command}")


# --- kill -9 of tritonserver ------------------------------------------------------------------------------------------


def test_a_killed_tritonserver_is_restarted_on_the_same_ports_with_the_same_key(served: Served) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    killed = served.server_pid()
    key = served.key_file.read_text()
    host, port = served.http_url.split(":")
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    kept_open = socket.create_connection((host, int(port)), timeout=30)  # an HTTP keep-alive connection
    kept_open.sendall(ready)
    assert kept_open.recv(4096).startswith(b"HTTP/1.1 200 ")
    os.kill(killed, signal.SIGKILL)
    line = served.wait_for_line("tritonserver serving again", 120)
    kept_open.sendall(ready)  # its upstream died with tritonserver: answered, not hung
    assert kept_open.recv(4096).startswith(b"HTTP/1.1 502 "), "a request on a connection opened before the restart"
    kept_open.close()
    crash = served.wait_for_line("exited unexpectedly (signal 9: SIGKILL)", 1)
    kept_log = Path(crash.split("(log ")[1].split(")")[0])
    assert kept_log.is_file() and "restart 1" in line
    assert served.server_pid() != killed and served.key_file.read_text() == key
    client = grpcclient.InferenceServerClient(served.grpc_url)
    response = client.infer("digits", [_bytes_input([_digit_png()])], client_timeout=30)
    assert response.as_numpy("logits_digits").shape == (1, 10)
    assert client.get_model_repository_index(headers=served.key().grpc_headers).models  # the same key opens it
    client.close()
    http = httpclient.InferenceServerClient(served.http_url)
    assert http.is_server_ready() and http.is_model_ready("digits_patched")
    http.close()
    assert json.loads(served.key_file.read_text())["http"].endswith(str(served.http_port))


# --- failures that leave things behind ---------------------------------------------------------------------------


def test_a_stub_that_dies_during_warmup_once_is_started_again(tiny_export: Path, tmp_path: Path) -> None:
    """A python stub that misses its health check while warming up ("Stub process '...' is not healthy": starved for
    a second on a saturated machine) makes tritonserver exit; `patcher serve` starts it again, saying so. Here the
    stub stops itself (SIGSTOP: its health thread too) on its first warmup request only. tritonserver then exits
    with that message, or now and then dies of SIGSEGV in its clean-up (seen once in a fresh clone's CI; a stub killed
    outright does so often): either is started again once. Without the retry of the message (a SIGSEGV was retried
    before) the test fails on the usual path."""
    repo, marker = tmp_path / "repo", tmp_path / "killed-once"
    write_repository(tiny_export, repo)
    model = repo / "digits_preprocess" / "1" / "model.py"
    head = "    def execute(self, requests: list[Any]) -> list[Any]:\n"
    suicide = (f"        if not os.path.exists({str(marker)!r}):\n            open({str(marker)!r}, 'w').close()\n"
               "            os.kill(os.getpid(), 19)\n")  # SIGSTOP
    assert head in model.read_text()
    model.write_text(model.read_text().replace(head, head + suicide, 1))
    published_by_hand(repo, "digits_preprocess/1/model.py")
    served = Served(repo, tmp_path / "key.json", models=["digits_preprocess"])
    try:
        again = [line for line in served.lines if "starting it again (try 2" in line]
        assert marker.exists() and len(again) == 1, served.lines
        assert "is not healthy" in again[0] or "(signal 11: SIGSEGV)" in again[0], again
    finally:
        assert served.stop() == 0


def test_a_failed_start_names_a_log_that_exists_and_leaves_no_folder(tiny_export: Path, tmp_path: Path) -> None:
    from patcher.triton.serving.ports import distinct_free_ports

    repo = tmp_path / "repo"
    write_repository(tiny_export, repo)
    (repo / "digits_zeroshot" / "1" / "model.py").write_text("raise RuntimeError('this model cannot start')\n")
    published_by_hand(repo, "digits_zeroshot/1/model.py")  # a broken model, but the one published
    serve = _serve(repo, tmp_path / "key.json", *distinct_free_ports(3))
    _, err = serve.communicate(timeout=300)
    (line,) = err.strip().splitlines()[-1:]
    assert serve.returncode == 2 and line.startswith("error: tritonserver exited during startup"), err
    assert "load failed for model 'digits_zeroshot'" in line and "this model cannot start" in line
    log = Path(line.split("(log ")[1].split(")")[0])
    assert log.is_file() and "this model cannot start" in log.read_text(errors="replace")
    assert not owned_scratch("patcher-triton-", serve.pid) and not (tmp_path / "key.json").exists()


def test_sigterm_during_bench_removes_its_server_and_temporary_folders(tiny_run: Path, tiny_export: Path,
                                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("onnx"))
    shutil.copytree(tiny_export, run / "onnx")
    bench = subprocess.Popen([sys.executable, "-m", "patcher", "bench", str(run), "--out", str(tmp_path / "out"),
                              "--concurrency", "1", "--batch-sizes", "1", "--duration", "30"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline and bench.poll() is None, bench.communicate()[1][-2000:]
        folders = owned_scratch("patcher-bench-", bench.pid) + owned_scratch("patcher-triton-", bench.pid)
        with contextlib.suppress(AssertionError):
            if len(folders) == 2:
                tritonserver = _child(bench.pid, "bin/tritonserver")
                break
        time.sleep(0.1)
    time.sleep(3)  # serving and measuring by now, or still loading: either way it must clean up
    bench.send_signal(signal.SIGTERM)
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: patcher bench stopped by SIGTERM"), err[-2000:]
    assert not any(folder.exists() for folder in folders) and not group_pids(tritonserver)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_killed_serve_leaves_a_folder_the_next_server_sweeps(repo: Path, tmp_path: Path) -> None:
    from patcher.triton.serving.ports import distinct_free_ports

    serve = _serve(repo, tmp_path / "key.json", *distinct_free_ports(3), models="digits_pixels")
    assert serve.stdout is not None
    while "Ctrl-C stops it" not in serve.stdout.readline():
        assert serve.poll() is None, serve.communicate()[1][-2000:]
    (workdir,) = owned_scratch("patcher-triton-", serve.pid)
    tritonserver = _child(serve.pid, "bin/tritonserver")
    serve.kill()  # kill -9: no clean-up runs; tritonserver follows it (PDEATHSIG)
    serve.wait(timeout=30)
    assert workdir.is_dir()  # left behind (checked at once: a server another xdist worker starts may sweep it next)
    deadline = time.monotonic() + 60
    while group_pids(tritonserver) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_pids(tritonserver)
    time.sleep(5.5)  # past the grace a brand-new folder gets
    with TritonServer(repo, models=["digits_pixels"], settings=ServerSettings(startup_timeout_s=120)):
        assert not workdir.exists()


def test_a_low_soft_open_file_limit_is_raised_and_serve_starts(repo: Path, tmp_path: Path) -> None:
    import resource

    from patcher.triton.serving.ports import distinct_free_ports

    http, grpc, metrics = distinct_free_ports(3)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    serve = subprocess.Popen([sys.executable, "-m", "patcher", "serve", "--repo", str(repo), "--key-file",
                              str(tmp_path / "key.json"), "--http-port", str(http), "--grpc-port", str(grpc),
                              "--metrics-port", str(metrics)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=environment(),
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    assert serve.stdout is not None
    lines = []
    while not lines or "Ctrl-C stops it" not in lines[-1]:
        lines.append(serve.stdout.readline())
        assert lines[-1] or serve.poll() is None, serve.communicate()[1][-2000:]
    log = Path(next(line for line in lines if line.strip().startswith("log")).split()[-1])
    assert log.is_file()
    serve.send_signal(signal.SIGINT)
    _, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err[-2000:]
    assert not log.exists()  # the work folder went with it; nothing failed, so nothing was kept
