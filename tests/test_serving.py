"""Serving that can be trusted, against a real `patcher serve` (bundled Triton 2.51): a closed control plane, bounded
inputs, Triton's image-classification conventions, a killed backend healed, live rollout without failed requests.

One server for the module; the tests run in file order (the rollout tests change versions, so they come last).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from serving_support import (
    EVIL_CONFIG,
    Load,
    Served,
    classification_fields,
    encoded,
    entry_models,
    evil_code,
    export_record,
    half_publish,
    image_client_parse,
    image_client_preprocess,
    patcher_triton,
    peak_rss_mb,
    png,
    reference_logits,
    served_versions,
    variant,
    wait_for_version,
)
from triton_support import requires_bundled_triton

from patcher.base.errors import PatcherError
from patcher.triton.client import ClassifyOptions, Endpoint, classify_files
from patcher.triton.repository.publish import (
    STAGING_PREFIX,
    read_journal,
)
from patcher.triton.repository.stores import model_versions
from patcher.triton.repository.writer import RepositoryOptions, write_repository

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
MAX_BATCH = 16
MAX_BYTES = 1 << 20  # smaller than the default, to show the byte limit with a small file
OPTIONS = {"max_batch_size": MAX_BATCH, "limits": {"max_bytes": MAX_BYTES}}
RSS_LIMIT_MB = 600
HEAL_S = ROLLOUT_S = 60
MARKER = "uploaded-code-ran"


@pytest.fixture(scope="module")
def export(tiny_export: Path) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def repo(export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("served") / "repo"
    assert write_repository(export, repo, RepositoryOptions(**OPTIONS)).version == 1
    return repo


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    server = Served(repo, tmp_path_factory.mktemp("keys") / "serve.key.json", log=repo.parent / "tritonserver.log")
    yield server
    assert server.stop() == 0, "\n".join(server.lines[-30:])
    assert not server.key_file.exists()  # the key goes with the server


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Image.Image, int]]:
    """60 digits test images as PNG files: (path, image, true label)."""
    from patcher.data.tasks import get_task

    folder, test = tmp_path_factory.mktemp("digits"), get_task("digits").dataset("test")
    items = []
    for index in range(60):
        image, label = test[index]
        path = folder / f"{index:03d}.png"
        path.write_bytes(encoded(image))
        items.append((path, Image.open(path), int(label)))
    return items


def _grpc(served: Served):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(served.grpc_url)


def _bytes_input(blobs: list[bytes]):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("image_bytes", [len(blobs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_).reshape(-1, 1))
    return tensor


def _triton(export: Path, repo: Path) -> str:
    return patcher_triton(export, repo, "--max-batch-size", str(MAX_BATCH), "--max-image-bytes", str(MAX_BYTES))


# --- a closed control plane -------------------------------------------------------------------------------------


def test_uploaded_code_is_refused_without_the_key_and_runs_with_it(served: Served, tmp_path: Path) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    assert served.key_file.stat().st_mode & 0o777 == 0o600 and served.key_file.parent.stat().st_mode & 0o077 == 0
    marker, files = tmp_path / MARKER, {"file:1/model.py": evil_code(tmp_path / MARKER)}
    client, http = _grpc(served), httpclient.InferenceServerClient(served.http_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.load_model("evil", config=EVIL_CONFIG, files=files)
    with pytest.raises(InferenceServerException, match="restricted"):
        http.load_model("evil", config=EVIL_CONFIG, files=files)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("digits")
    with pytest.raises(InferenceServerException, match="restricted"):
        client.register_system_shared_memory("x", "/x", 64)
    time.sleep(0.5)
    assert not marker.exists() and client.is_model_ready("digits") and not client.is_model_ready("evil")

    key = served.key()
    client.load_model("evil", config=EVIL_CONFIG, files=files, headers=key.grpc_headers)
    assert marker.read_text() == "ran" and client.is_model_ready("evil")  # the key holder can, by design
    client.unload_model("evil", headers=key.grpc_headers)
    deadline = time.monotonic() + 30
    while not client.is_server_ready() and time.monotonic() < deadline:  # unloading finishes after the call
        time.sleep(0.1)
    assert client.is_server_ready() and not client.is_model_ready("evil")
    client.close()
    http.close()


def test_a_web_page_cannot_load_models(served: Served) -> None:
    """A cross-origin `text/plain` POST (no preflight) is refused; a custom header would need a preflight."""
    for path in ("/v2/repository/models/digits_zeroshot/load", "/v2/repository/models/digits/unload",
                 "/v2/repository/index"):
        request = urllib.request.Request(f"http://{served.http_url}{path}", data=b"{}", method="POST",
                                         headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403 and b"restricted" in refused.value.read()


def test_inference_health_metadata_stay_open_and_patchers_commands_use_the_key(served: Served, digits) -> None:
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(served.http_url)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("digits")
    assert http.get_model_metadata("digits_digits_pixels")["inputs"][0]["name"] == "pixels"
    assert http.get_model_config("digits_digits_pixels")["input"][0]["format"] == "FORMAT_NCHW"
    assert http.get_inference_statistics("digits")["model_stats"]
    http.close()
    assert len(classify_files([p for p, _, _ in digits[:3]], "digits", endpoint=Endpoint(url=served.grpc_url))) == 3
    with pytest.raises(PatcherError, match=r"no ready model 'nope'.*digits_patched \(READY\)"):
        # the index needs the key
        classify_files([digits[0][0]], "nope", endpoint=Endpoint(url=served.grpc_url, key_file=served.key_file))


# --- bounded inputs ---------------------------------------------------------------------------------------------


def test_image_bombs_are_refused_before_decoding_and_good_requests_are_unaffected(served: Served, digits) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    good = digits[0][0].read_bytes()
    noise = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    hostile = {
        "max_aspect": png(1, 1_000_000, 3),   # 3 KB, passes PIL's bomb check, 224 x 224e6 once resized
        "max_pixels": png(20000, 20000),      # 400 megapixels in 390 KB
        "max_bytes": b"\xff\xd8\xff" + bytes(MAX_BYTES),  # over the byte limit (1 MB here)
        "cannot decode": b"definitely not an image",
        "cannot decode image (6": noise[: len(noise) // 2],  # a truncated PNG
    }
    client = _grpc(served)

    def good_request(own) -> None:
        response = own.infer("digits", [_bytes_input([good])], client_timeout=30)
        assert response.as_numpy("logits_digits").shape == (1, 10)

    with Load(good_request, lambda: _grpc(served), threads=1) as load:
        for reason, blob in hostile.items():
            for _ in range(3):
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("digits", [_bytes_input([good, blob])], client_timeout=60)
                assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value.message()
                assert "item 1: " in refused.value.message() and reason in refused.value.message()
        http = httpclient.InferenceServerClient(served.http_url)
        inputs = [httpclient.InferInput("image_bytes", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[hostile["max_pixels"]]], dtype=np.object_))
        with pytest.raises(InferenceServerException) as refused:
            http.infer("digits_digits_bytes", inputs)
        assert refused.value.status() == "400" and "max_pixels" in refused.value.message()
        http.close()
        time.sleep(0.5)
    assert not load.failures, load.failures[:3]
    assert load.succeeded > 0
    assert peak_rss_mb(served.stub("digits_preprocess").pid) < RSS_LIMIT_MB
    good_request(client)
    client.close()


def _raw_http(served: Served, *parts: bytes, pause_s: float = 0.0, timeout_s: float = 30) -> bytes:
    """Send `parts` on one connection (pausing between them), then read until the server closes or goes quiet."""
    host, port = served.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        received = b""
        for part in parts:
            connection.sendall(part)
            time.sleep(pause_s)
        connection.settimeout(3 if pause_s else timeout_s)
        with contextlib.suppress(TimeoutError):
            while block := connection.recv(1 << 16):
                received += block
    return received


def _json_pixels(shape: list[int]) -> bytes:
    body = {"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32", "data": [0.0] * math.prod(shape)}]}
    return json.dumps(body).encode()


def test_the_http_front_refuses_a_body_over_the_bound_unread_and_one_of_unknown_length(served: Served) -> None:
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
    # 4 GB announced and none sent: an answer at all means the front judged the head alone (one that waited for the
    # body would leave the read to time out empty), so no clock is needed to show it.
    refused = _raw_http(served, head + b"Content-Length: 4000000000\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 413 ") and b"4000000000 bytes is larger than" in refused, refused[:300]
    chunked = _raw_http(served, head + b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in chunked, chunked[:300]
    garbage = _raw_http(served, b"\x16\x03\x01 not http at all\r\n\r\n")  # e.g. TLS spoken to a plain port
    assert garbage.startswith(b"HTTP/1.1 400 "), garbage[:300]
    assert _raw_http(served, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     ).startswith(b"HTTP/1.1 200 ")


def test_the_http_front_keeps_connections_alive_and_answers_expect_100_continue(served: Served, export: Path,
                                                                                digits) -> None:
    size = export_record(export)["preprocess"]["image_size"]
    body = _json_pixels([1, 3, *size])
    head = (f"POST /v2/models/digits_digits_pixels/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    answer = _raw_http(served, head + b"Expect: 100-continue\r\n\r\n", body, pause_s=0.5)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), answer[:300]
    assert answer.count(b"HTTP/1.1 100") == 1  # tritonserver's own 100 (if any) never reaches the client twice
    two = _raw_http(served, head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body, pause_s=0.2)
    assert two.count(b"HTTP/1.1 200 ") == 2 and two.count(b'"outputs"') == 2, two[:300]


def test_http_clients_that_leave_mid_answer_leave_nothing_behind(served: Served, digits) -> None:
    import tritonclient.http as httpclient

    blob = digits[0][0].read_bytes()
    http = httpclient.InferenceServerClient(served.http_url)
    inputs = [httpclient.InferInput("image_bytes", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[blob]], dtype=np.object_))
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs)
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    host, port = served.http_url.split(":")
    for _ in range(40):  # each sends a whole request and hangs up before the answer
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(head + body)
    for _ in range(5):
        assert http.infer("digits", inputs).as_numpy("logits_digits").shape == (1, 10)
    http.close()


# --- Triton's conventions, as NVIDIA's example clients use them -------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_per_task_pixels_models_answer_as_image_client_expects(served: Served, export: Path, digits,
                                                               protocol: str) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(served.grpc_url if protocol == "grpc" else served.http_url)
    grpc_client = _grpc(served)
    record = export_record(export)
    for task, info in record["tasks"].items():
        model = f"digits_{task.replace('-', '_')}_pixels"
        parsed = image_client_parse(grpc_client.get_model_metadata(model), grpc_client.get_model_config(model).config)
        max_batch, input_name, output_name, c, h, w, fmt, dtype = parsed
        assert (max_batch, input_name, output_name, c, dtype) == (MAX_BATCH, "pixels", info["output"], 3, "FP32")
        assert [h, w] == record["preprocess"]["image_size"]
        batch = np.stack([image_client_preprocess(image, fmt, c, h, w) for _, image, _ in digits[:MAX_BATCH]])
        inputs = [module.InferInput(input_name, list(batch.shape), dtype)]
        inputs[0].set_data_from_numpy(batch)
        outputs = [module.InferRequestedOutput(output_name, class_count=3)]
        answers = client.infer(model, inputs, outputs=outputs).as_numpy(output_name)
        assert answers.shape == (MAX_BATCH, 3)
        reference = reference_logits(export, batch, task)
        for row, logits in zip(answers, reference, strict=True):
            fields = [classification_fields(entry) for entry in row]
            assert [label for _, _, label in fields] == [info["classnames"][index] for _, index, _ in fields]
            np.testing.assert_allclose([score for score, _, _ in fields], np.sort(logits)[::-1][:3], rtol=1e-4,
                                       atol=1e-4)
            best, second = np.sort(logits)[::-1][:2]
            if best - second > 1e-3:  # a near-tie may order either way
                assert fields[0][1] == int(logits.argmax())
    client.close()
    grpc_client.close()


def test_per_task_bytes_models_answer_as_ensemble_image_client_expects(served: Served, export: Path, digits) -> None:
    import tritonclient.grpc as grpcclient

    record = export_record(export)
    client = _grpc(served)
    blobs = [np.array([path.read_bytes()], dtype=bytes) for path, _, _ in digits[:MAX_BATCH]]  # as that client does
    batch = np.stack(blobs, axis=0)
    multi = classify_files([path for path, _, _ in digits[:MAX_BATCH]], "digits",
                           endpoint=Endpoint(url=served.grpc_url), options=ClassifyOptions(top_k=2))
    for task in record["tasks"]:
        model = f"digits_{task.replace('-', '_')}_bytes"
        metadata, config = client.get_model_metadata(model), client.get_model_config(model).config
        assert len(metadata.inputs) == 1 and len(config.input) == 1
        tensor = grpcclient.InferInput(metadata.inputs[0].name, list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        wanted = [grpcclient.InferRequestedOutput(output.name, class_count=2) for output in metadata.outputs]
        response = client.infer(model, [tensor], outputs=wanted)
        for output in metadata.outputs:  # every output, as that client asks for them all
            rows = response.as_numpy(output.name)
            assert len(rows) == MAX_BATCH
            labels = [[classification_fields(entry)[2] for entry in row] for row in rows]
            assert labels == [[e["label"] for e in result["tasks"][task]] for result in multi]
    client.close()


# --- self-healing -----------------------------------------------------------------------------------------------


def test_a_killed_backend_serves_again_within_60_s_and_readiness_tells_the_truth(served: Served, export) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    height, width = export_record(export)["preprocess"]["image_size"]
    client = _grpc(served)
    tensor = grpcclient.InferInput("image", [1, 3, height, width], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, height, width), np.float32))
    client.infer("digits_patched", [tensor])
    killed = served.stub("digits_patched")
    os.kill(killed.pid, signal.SIGSEGV)
    started, seen = time.monotonic(), []  # (seconds, ready, answered)
    while time.monotonic() - started < HEAL_S:
        ready = client.is_model_ready("digits_patched")
        try:
            client.infer("digits_patched", [tensor], client_timeout=20)
            answered = True
        except InferenceServerException:
            answered = False
        seen.append((round(time.monotonic() - started, 2), ready, answered))
        if answered and any(not r for _, r, _ in seen):
            break
        time.sleep(0.05)
    assert seen[-1][2], f"not serving {HEAL_S} s after the kill: {seen[-5:]}"
    assert served.stub("digits_patched").pid != killed.pid
    noticed = next(i for i, (_, ready, _) in enumerate(seen) if not ready)
    assert all(answered for _, ready, answered in seen[noticed:] if ready), seen  # from then on, ready means ready
    served.wait_for_line("healing: digits_patched serving again", 30)
    for model in ("digits", "digits_digits_bytes"):  # the ensembles that use it answer again
        deadline = time.monotonic() + 30
        while not client.is_model_ready(model) and time.monotonic() < deadline:
            time.sleep(0.1)
        client.infer(model, [_bytes_input([png(8, 8, 3)])])
    client.close()


# --- live rollout -----------------------------------------------------------------------------------------------


def test_a_new_version_is_live_within_60_s_with_no_failed_requests(served: Served, export: Path, repo: Path, digits,
                                                                    tmp_path: Path) -> None:
    good = digits[0][0].read_bytes()
    models = entry_models(export)

    def request(client) -> None:
        client.infer("digits", [_bytes_input([good])], client_timeout=30)

    def per_task(client) -> None:
        client.infer("digits_digits_bytes", [_bytes_input([good, good])], client_timeout=30)

    new = model_versions(repo / models[0])[-1] + 1  # 2, unless another test of the module ran first on this worker
    client = _grpc(served)
    with Load(request, lambda: _grpc(served), threads=2) as load, Load(per_task, lambda: _grpc(served)) as other:
        time.sleep(0.5)
        assert f"wrote version {new} of digits" in _triton(variant(export, tmp_path / "swapped", swap=True), repo)
        wait_for_version(client, models, str(new), ROLLOUT_S)
        time.sleep(0.5)
    assert not load.failures and not other.failures, (load.failures + other.failures)[:3]
    assert load.succeeded > 0 and other.succeeded > 0
    assert served.wait_for_line(f"rollout: digits_patched version {new} serving", 5)
    swapped = classify_files([p for p, _, _ in digits[:30]], "digits", endpoint=Endpoint(url=served.grpc_url),
                             options=ClassifyOptions(top_k=1))
    record = export_record(export)
    session = ort.InferenceSession(str(export / "zeroshot.onnx"), providers=["CPUExecutionProvider"])
    from patcher.triton.imaging import decode_image, preprocess_image

    batch = np.stack([preprocess_image(decode_image(p.read_bytes()), record["preprocess"]) for p, _, _ in digits[:30]])
    (zeroshot,) = session.run(["logits_digits"], {"image": batch})
    agree = [int(r["tasks"]["digits"][0]["index"]) == int(z.argmax()) for r, z in zip(swapped, zeroshot, strict=True)]
    assert np.mean(agree) > 0.9  # the new version serves the zero-shot weights (near-ties aside)
    client.close()


def test_a_half_published_update_is_never_loaded_and_the_next_run_completes_it(served: Served, export: Path,
                                                                              repo: Path, digits, tmp_path) -> None:
    models = entry_models(export)
    # the module's tests share one repository; xdist may run this one on a worker where the rollout test did not run
    live = model_versions(repo / models[0])[-1]
    half = live + 1
    renamed = variant(export, tmp_path / "renamed", labels="digit {}")
    journal = half_publish(repo, renamed, tmp_path / "scratch", OPTIONS)
    assert (repo / models[0] / str(half)).is_dir() and not (repo / models[1] / str(half)).exists()
    served.wait_for_line("is half-published", 30)
    time.sleep(3)  # several more rounds of the watcher
    client = _grpc(served)
    assert served_versions(client, models) == [[str(live)]] * len(models)
    assert not [line for line in served.lines if f"version {half}" in line]

    out = _triton(renamed, repo)  # the next run finishes the interrupted one, then has nothing to add
    assert f"finished publishing version {half} of digits" in out and f"already version {half}" in out
    assert read_journal(repo).serial == journal.serial and not read_journal(repo).publishing  # nothing new to commit
    assert not list(repo.glob(f"{STAGING_PREFIX}*"))
    wait_for_version(client, models, str(half), ROLLOUT_S)
    results = classify_files([digits[0][0]], "digits", endpoint=Endpoint(url=served.grpc_url),
                             options=ClassifyOptions(top_k=1))
    assert results[0]["tasks"]["digits"][0]["label"].startswith("digit ")  # labels went live with the version
    client.close()
