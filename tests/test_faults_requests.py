"""Requests that must not take serving down (issue #30), against a real `patcher serve` (bundled Triton 2.51) on the
tiny run's export with its open-vocabulary models: a JSON bomb through the HTTP front, format-specifier templates,
long words, the largest label set the limits allow.

One server for the module; each test checks that tritonserver is the same process afterwards.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import Served, encoded
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
