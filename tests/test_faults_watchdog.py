"""A tritonserver that stops serving without exiting (issue #30, row 6), with the bundled tritonserver under a real
`patcher serve`: stopped with SIGSTOP it is noticed and replaced within 30 s, the reason named; one that crashes while
starting (SIGABRT) is started again; restarts back off."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import Served, encoded, environment
from triton_support import requires_bundled_triton

from patcher.triton.repository.writer import write_repository
from patcher.triton.serving.foreground import backoff_s
from patcher.triton.serving.ports import distinct_free_ports

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
REPLACED_S = 30


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("watchdog") / "repo"
    write_repository(tiny_export, repo)
    return repo


def _classify(url: str) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([encoded(Image.new("L", (28, 28), 200))], dtype=np.object_).reshape(1, 1))
        return client.infer("digits", [tensor], client_timeout=30).as_numpy("logits_digits")
    finally:
        client.close()


def test_restarts_back_off() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_stopped_tritonserver_is_noticed_and_replaced_within_30_s(repo: Path, tmp_path: Path) -> None:
    served = Served(repo, tmp_path / "key.json", models=["digits"])  # the process is the point, not the models
    try:
        stopped = served.server_pid()
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        line = served.wait_for_line("tritonserver serving again", REPLACED_S + 60)
        replaced = time.monotonic() - started
        reason = served.wait_for_line(f"tritonserver (pid {stopped}) has been stopped for", 1)
        assert "process state T: SIGSTOP" in reason and "restart 1" in line
        assert "pinned memory" not in reason, reason  # the reason, not the log's last line
        assert replaced < REPLACED_S, f"replaced {replaced:.1f} s after SIGSTOP"
        assert served.server_pid() != stopped and _classify(served.grpc_url).shape == (1, 10)
        assert not Path(f"/proc/{stopped}").exists()
    finally:
        assert served.stop() == 0


def test_a_tritonserver_that_crashes_while_starting_is_started_again(repo: Path, tmp_path: Path) -> None:
    http, grpc, metrics = distinct_free_ports(3)
    command = [sys.executable, "-m", "patcher", "serve", "--repo", str(repo), "--key-file", str(tmp_path / "k.json"),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--models", "digits"]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=environment())
    try:
        deadline, aborted = time.monotonic() + 120, None
        while aborted is None and time.monotonic() < deadline:  # SIGABRT the first tritonserver the moment it runs
            for entry in Path("/proc").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == serve.pid and b"tritonserver" in (entry / "cmdline").read_bytes():
                        aborted = int(entry.name)
                        os.kill(aborted, signal.SIGABRT)
            time.sleep(0.01)
        assert aborted is not None, "no tritonserver started"
        lines = []
        assert serve.stdout is not None
        for line in serve.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        output = "".join(lines)
        assert "exited during startup (signal 6: SIGABRT)" in output and "(try 2 of 3)" in output, output
        assert "Ctrl-C stops it" in output, output
        assert _classify(f"127.0.0.1:{grpc}").shape == (1, 10)
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=60)
    assert serve.returncode == 0
