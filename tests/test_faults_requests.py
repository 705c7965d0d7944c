"""Requests that must not take serving down (issue #30), against a real `patcher serve` (bundled Triton 2.51) on the
tiny run's export with its open-vocabulary models: a JSON bomb through the HTTP front, format-specifier templates,
long words, the largest label set the limits allow.

One server for the module; each test checks that tritonserver is the same process afterwards.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import string
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from faults_support import the_error_line
from PIL import Image
from serving_support import Served, encoded, environment, peak_rss_mb
from triton_support import requires_bundled_triton

from patcher.triton.repository.writer import write_repository
from patcher.triton.serving.json_guard import MAX_JSON_DEPTH, check_json, json_depth

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
BOMBS = 20


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("requests") / "repo"
    write_repository(tiny_export, repo)
    return repo


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    server = Served(repo, tmp_path_factory.mktemp("keys") / "serve.key.json")
    yield server
    assert server.stop() == 0, "\n".join(server.lines[-30:])


def _post(url: str, path: str, body: bytes, headers: str = "", timeout_s: float = 30) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on its own connection: (status, body)."""
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def _digit_png() -> bytes:
    return encoded(Image.fromarray(np.full((28, 28), 200, np.uint8)))


# --- the JSON part measured -------------------------------------------------------------------------------------


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth(b'{"inputs": [{"data": [[1, 2], [3, 4]]}]}') == 5
    assert json_depth(b'{"name": "[[[[[[[[[[", "x": "\\"[[[", "y": "\\\\", "z": [1]}') == 2
    assert json_depth(b"[" * 200_000) == 200_000
    check_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    nested = json.dumps({"inputs": [{"name": "x", "data": np.zeros((2, 3, 8, 8)).tolist()}]}).encode()
    check_json(nested)  # a legitimate nested tensor, more brackets than the depth bound
    with pytest.raises(ValueError, match="nests 200000 levels deep"):
        check_json(b"[" * 200_000)


# --- row 1: the JSON bomb ---------------------------------------------------------------------------------------


def test_a_json_bomb_gets_a_4xx_and_tritonserver_is_the_same_process_after_twenty(served: Served) -> None:
    pid = served.server_pid()
    bomb = b"[" * 200_000
    for _ in range(BOMBS):
        status, body = _post(served.http_url, "/v2/models/digits/infer", bomb)
        assert status == 400 and b"nests 200000 levels deep" in body, (status, body[:200])
    status, _ = _post(served.http_url, "/v2/models/digits/infer", b"{" * 50_000,
                      "Inference-Header-Content-Length: 50000\r\n")
    assert status == 400
    assert served.server_pid() == pid
    blob = struct.pack("<I", len(_digit_png())) + _digit_png()  # a BYTES element: its length, then its bytes
    request = json.dumps({"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                                      "parameters": {"binary_data_size": len(blob)}}]}).encode()
    status, body = _post(served.http_url, "/v2/models/digits/infer", request + blob,
                         f"Inference-Header-Content-Length: {len(request)}\r\n")
    assert status == 200, body[:300]
    assert served.server_pid() == pid


# --- rows 3 and 4: label sets checked before any prompt is built ------------------------------------------------


def _infer(url: str, model: str, inputs: dict[str, list[bytes]], timeout_s: float | None = 30) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        tensors = []
        for name, values in inputs.items():
            array = np.array(values, dtype=np.object_)
            array = array.reshape(-1, 1) if name in ("image_bytes", "text") else array
            tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(model, tensors, client_timeout=timeout_s)
        return result.as_numpy("text_embedding" if model.endswith("_text") else "scores")
    finally:
        client.close()


def _shm_bytes(served: Served) -> int:
    """The bytes of the server's python-backend shared-memory regions in /dev/shm."""
    cmdline = Path(f"/proc/{served.server_pid()}/cmdline").read_bytes().split(b"\0")
    (prefix,) = [arg.split(b"=")[-1].decode() for arg in cmdline if b"shm-region-prefix-name" in arg]
    return sum(path.stat().st_size for path in Path("/dev/shm").glob(f"{prefix}*"))


def _refused(url: str, model: str, inputs: dict[str, list[bytes]], timeout_s: float = 30) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as raised:
        _infer(url, model, inputs, timeout_s)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.message()
    return str(raised.value.message())


def _random_word(rng: random.Random, letters: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=letters))


def test_format_specifier_templates_are_refused_at_once_without_memory(served: Served) -> None:
    pid, image = served.server_pid(), [_digit_png()]
    _infer(served.grpc_url, "digits_classify", {"image_bytes": image, "labels": [b"warm", b"up"]})
    stubs = [served.stub("digits_classify").pid, served.stub("digits_text").pid]
    peaks, shm = [peak_rss_mb(p) for p in stubs], _shm_bytes(served)
    started = time.monotonic()
    message = _refused(served.grpc_url, "digits_classify",
                       {"image_bytes": image, "labels": [b"cat"], "templates": [b"{:>300000000}"]})
    elapsed = time.monotonic() - started
    assert "must hold a bare {} for the label, without a format specifier" in message
    assert elapsed < 1.0, f"refused after {elapsed:.1f} s"
    growth = [peak_rss_mb(p) - before for p, before in zip(stubs, peaks, strict=True)]
    assert max(growth) < 50, f"stub peaks grew by {growth} MB"
    assert _shm_bytes(served) == shm
    for template, expected in [(b"{:d}", "without a format specifier"), (b"{:{}}", "without a format specifier"),
                               (b"{!r}", "or conversion"), (b"{0}", "exactly one {}")]:
        assert expected in _refused(served.grpc_url, "digits_classify",
                                    {"image_bytes": image, "labels": [b"cat"], "templates": [template]})
    assert served.server_pid() == pid


def test_long_words_are_refused_before_bpe_and_the_largest_request_is_answered(served: Served) -> None:
    from tritonclient.utils import InferenceServerException

    pid, rng, image = served.server_pid(), random.Random(4), [_digit_png()]
    words = [_random_word(rng, 4000).encode() for _ in range(12)]

    def abandoned(word: bytes) -> None:
        with contextlib.suppress(InferenceServerException):
            _infer(served.grpc_url, "digits_text", {"text": [word]}, timeout_s=0.1)

    threads = [threading.Thread(target=abandoned, args=(word,)) for word in words]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = time.monotonic()
    scores = _infer(served.grpc_url, "digits_classify", {"image_bytes": image, "labels": [b"kestrel", b"ferret"]})
    fresh = time.monotonic() - started
    assert scores.shape == (1, 2) and fresh < 2.0, f"a new 2-label set after the long words took {fresh:.1f} s"
    assert "is 4000 bytes long, more than MAX_WORD_BYTES=64" in _refused(served.grpc_url, "digits_text",
                                                                           {"text": [words[0]]})
    labels = sorted({_random_word(rng, 12) for _ in range(1200)})[:1000]  # max_labels, each unknown to the cache
    started = time.monotonic()
    scores = _infer(served.grpc_url, "digits_classify", {"image_bytes": image, "labels": [w.encode() for w in labels],
                                                         "templates": [b"a photo of a {}."]}, timeout_s=60)
    largest = time.monotonic() - started
    assert scores.shape == (1, 1000) and largest < 5.0, f"1,000 new labels took {largest:.1f} s"
    for labels, templates, expected in [
            ([str(i).encode() for i in range(40)], [b"%d {}" % i for i in range(40)],
             "40 labels x 40 templates make 1600 prompts, more than max_prompts=1024"),
            ([b"\x01\x02"], None, "holds only control or format characters"),
            ([b"x" * 5000], None, "more than max_prompt_bytes=4096")]:
        inputs = {"image_bytes": image, "labels": labels, **({"templates": templates} if templates else {})}
        assert expected in _refused(served.grpc_url, "digits_classify", inputs)
    assert served.server_pid() == pid


def test_classify_with_labels_that_hold_no_label_is_one_error_line(tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(_digit_png())
    done = subprocess.run([sys.executable, "-m", "patcher", "classify", str(image), "--model", "digits",
                           "--labels", ",,,", "--url", "127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                          env=environment())
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert "--labels ',,,' names no label" in the_error_line(done.stderr)
