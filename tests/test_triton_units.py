"""Pieces of serving that need no server: preprocessing parity, input limits read from headers, entry names, the
raw-pixel graph, the publish journal's recovery, the key file."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import png

from patcher.base.errors import PatcherError
from patcher.triton.imaging import (
    ImageRejected,
    decode_image,
    open_image,
    preprocess_image,
)
from patcher.triton.repository.entry import MAX_NAME, Entry, check_entry_name
from patcher.triton.serving.access import find_key, new_key, read_key_file, write_key_file
from patcher.triton.serving.http_front import HttpFront
from patcher.triton.serving.install import find_tritonserver
from patcher.triton.serving.native_front import native_front_binary, native_front_missing

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPEC = {"image_size": [224, 224], "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
        "resize_mode": "shortest"}


def test_preprocessing_is_open_clips_bit_for_bit() -> None:
    from patcher.data.transforms import eval_transform

    rng = np.random.default_rng(0)
    for size, resize_mode, (width, height), mode, fmt in [
        (32, "shortest", (8, 8), "RGB", "PNG"),
        (32, "shortest", (37, 61), "L", "PNG"),
        (224, "shortest", (300, 200), "RGB", "JPEG"),
        ((32, 48), "shortest", (50, 40), "RGBA", "PNG"),
        (32, "longest", (50, 20), "P", "PNG"),
        (32, "squash", (19, 40), "RGB", "PPM"),
    ]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, fmt)
        cfg = {"size": size, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": resize_mode}
        spec = {
            "image_size": [size, size] if isinstance(size, int) else list(size),
            "mean": CLIP_MEAN,
            "std": CLIP_STD,
            "interpolation": "bicubic",
            "resize_mode": resize_mode,
        }
        expected = eval_transform(cfg)(Image.open(io.BytesIO(buffer.getvalue()))).numpy()
        np.testing.assert_array_equal(preprocess_image(decode_image(buffer.getvalue()), spec), expected)


def test_missing_binary_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytriton", None)
    with pytest.raises(PatcherError, match=r"nvidia-pytriton==0\.7\.0.*docker run"):
        find_tritonserver()


def test_limits_are_checked_from_the_header_before_anything_is_decoded() -> None:
    cases = [
        (png(1, 1_000_000, 3), {}, r"1 x 1000000 pixels has aspect ratio 1000000\.0, more than max_aspect=12"),
        (png(20000, 20000), {}, r"exceeds max_pixels=36000000"),
        (png(3000, 3000), {"max_pixels": 8_000_000}, r"3000 x 3000 = 9000000 pixels exceeds max_pixels=8000000"),
        (png(40, 10), {"max_aspect": 3}, r"aspect ratio 4\.0, more than max_aspect=3"),
        (png(8, 8), {"max_bytes": 10}, r"image of \d+ bytes exceeds max_bytes=10"),
        (b"GIF89a" + bytes(4), {}, r"cannot decode image \(10 bytes\)"),
        (b"no image at all", {}, r"not a format this server reads"),
    ]
    for data, limits, message in cases:
        with pytest.raises(ImageRejected, match=message):
            decode_image(data, limits)
    lazy = open_image(png(3000, 3000))  # within the limits: the header is read, no pixel is decoded yet
    assert lazy.size == (3000, 3000) and lazy._im is None
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        decode_image(png(8, 8), {"max_pixels": 0})


def test_large_jpegs_are_decoded_at_reduced_scale_and_small_ones_exactly() -> None:
    rng = np.random.default_rng(1)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1800, 2400, 3), dtype=np.uint8)).save(big, "JPEG")
    drafted = decode_image(big.getvalue(), {}, SPEC)
    assert drafted.size == (600, 450)  # 1/4 scale: still at least twice the 298 x 224 the resize produces
    exact = decode_image(big.getvalue(), {"jpeg_draft": False}, SPEC)
    assert exact.size == (2400, 1800)
    a, b = preprocess_image(drafted, SPEC), preprocess_image(exact, SPEC)
    assert a.shape == b.shape == (3, 224, 224) and float(np.abs(a - b).mean()) < 0.1  # same picture, in std units
    small = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(small, "JPEG")
    assert decode_image(small.getvalue(), {}, SPEC).size == (400, 300)  # less than 2x: decoded in full


def test_entry_names_are_checked_not_rewritten() -> None:
    assert check_entry_name("a_b") == "a_b" and check_entry_name("Model2") == "Model2"
    for bad, hint in [("a/b", "'a_b'"), ("a-b", "'a_b'"), ("_x", "'x'"), ("", "'model'"), ("ü", "'model'")]:
        with pytest.raises(PatcherError, match=f"not a Triton model name.*e.g. {hint}"):
            check_entry_name(bad)
    with pytest.raises(PatcherError, match=f"300 characters long: use at most {MAX_NAME}"):
        check_entry_name("x" * 300)
    names = [m.name for m in Entry("digits", ("digits", "fashion-mnist")).models()]
    assert names == ["digits_preprocess", "digits_patched", "digits_zeroshot", "digits_pixels", "digits",
                     "digits_digits_pixels", "digits_digits_bytes", "digits_fashion_mnist_pixels",
                     "digits_fashion_mnist_bytes"]
    with pytest.raises(PatcherError, match="model names collide"):
        Entry("x", ("a", "a")).models()  # two tasks that make the same tensor name


def test_the_key_file_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    key = new_key()
    assert len(key.value) >= 40 and key.value != new_key().value
    assert key.server_flags()[0] == f"--http-restricted-api=model-repository,shared-memory,trace,logging:" \
                                     f"patcher-key={key.value}"
    assert key.grpc_headers == {"triton-grpc-protocol-patcher-key": key.value}
    assert find_key("127.0.0.1:1") is None
    from patcher.triton.serving.access import default_key_file

    written = write_key_file(key, default_key_file("127.0.0.1:1"), {"grpc": "127.0.0.1:1"})
    assert written.path is not None and written.path.stat().st_mode & 0o777 == 0o600
    assert written.path.parent.stat().st_mode & 0o777 == 0o700
    assert find_key("127.0.0.1:1") == written and json.loads(written.path.read_text())["grpc"] == "127.0.0.1:1"
    os.chmod(written.path, 0o644)
    with pytest.raises(PatcherError, match=r"readable by other users.*chmod 600"):
        read_key_file(written.path)
    assert find_key("127.0.0.1:1") is None  # a key others can read is not used


def test_an_image_sent_as_base64_text_is_told_how_to_send_bytes() -> None:
    """A KServe v2 JSON body's habit: the file base64-encoded. The refusal says to send the file's own bytes."""
    import base64

    with pytest.raises(ImageRejected, match=r"base64 text of an image file: send the file's own bytes"):
        open_image(base64.b64encode(png(8, 8)))
    with pytest.raises(ImageRejected, match=r"not a format this server reads"):
        open_image(b"plain text, not an image")


def test_a_refused_client_that_keeps_sending_still_reads_its_refusal() -> None:
    """The front answers 411 to a chunked body without reading it; the body bytes it never read must not turn its
    close into a reset that destroys the answer (CI lost the 411 this way once; here it is lost every time without
    the front's lingering close)."""
    upstream = socket.create_server(("127.0.0.1", 0))  # a port that takes connections; no request ever reaches it
    front = HttpFront("127.0.0.1", 0, upstream.getsockname()).start()
    try:
        port = front.port
        head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(head + b"ffff\r\n" + b"x" * 0xFFFF + b"\r\n")  # more than one read of the head takes
                received = b""
                while block := connection.recv(1 << 16):
                    received += block
            assert received.startswith(b"HTTP/1.1 411 "), received[:200]
    finally:
        front.stop()
        upstream.close()


def test_a_compiled_front_that_cannot_be_built_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("PATCHER_GOPATH", str(tmp_path / "no-gopath"))
    assert "golang-google-grpc-dev" in (native_front_missing() or "")
    with pytest.raises(PatcherError, match=r"cannot be built: .*golang-google-grpc-dev.*--grpc-front python"):
        native_front_binary()


def test_serve_names_the_fronts_it_has(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from patcher.cli import app

    (tmp_path / "repo").mkdir()
    result = CliRunner().invoke(app, ["serve", "--repo", str(tmp_path / "repo"), "--grpc-front", "rust",
                                      "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                                      "--key-file", str(tmp_path / "key.json")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "--grpc-front 'rust': choose one of auto, native, python" in errors[0]
    assert not (tmp_path / "key.json").exists()
