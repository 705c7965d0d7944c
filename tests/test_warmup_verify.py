"""model_warmup with the export's real sample in every backend model's config (both flavours), TensorRT provider
options, and `patcher verify` against a real served entry: it passes on the run's models and fails with one error
line when the zero-shot weights are published under the patched name."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from faults_support import run_patcher, the_error_line
from PIL import Image
from serving_support import (
    Served,
    entry_models,
    patcher_triton,
    published_by_hand,
    variant,
    wait_for_version,
)

from patcher.base.errors import PatcherError
from patcher.triton.repository.configs import TensorRT, read_config
from patcher.triton.repository.writer import RepositoryOptions, write_repository
from patcher.triton.serving.server import TritonServer

pytestmark = pytest.mark.slow
BACKEND_MODELS = ("preprocess", "patched", "zeroshot", "pixels")


def test_every_backend_model_warms_up_on_the_exports_sample(tiny_export: Path, tmp_path: Path) -> None:
    for backend in ("python", "onnxruntime"):
        repo = tmp_path / backend
        write_repository(tiny_export, repo, RepositoryOptions(backend=backend, max_batch_size=16,
                         tensorrt=TensorRT(fp16=True, workspace_bytes=1 << 30, cache="/cache/trt")
                         if backend == "onnxruntime" else None))
        for model in entry_models(tiny_export):
            config = read_config(repo / model)
            if config.platform == "ensemble":
                assert not config.model_warmup, model  # Triton warms instances; ensembles have none
                continue
            if model.endswith("_classify"):  # its task's own label set, the head cached (tests/test_classify_warmup.py)
                assert [(w.name, w.batch_size) for w in config.model_warmup] == [("digits_label_set", 1)], model
                assert (repo / model / "1" / "warm_head.npz").is_file()
                continue
            sizes = sorted(w.batch_size for w in config.model_warmup)
            assert sizes == ([1, 16] if backend == "onnxruntime" else [1]), (model, sizes)
            for tensor in config.input:
                data = (repo / model / "warmup" / config.model_warmup[0].inputs[tensor.name].input_data_file)
                assert data.is_file() and data.stat().st_size > 0
        sample = (tiny_export / "samples" / "digits.png").read_bytes()
        assert (repo / "digits_preprocess" / "warmup" / "image_bytes").read_bytes() == (
            struct.pack("<I", len(sample)) + sample)
        pixels = np.frombuffer((repo / "digits_pixels" / "warmup" / "pixels").read_bytes(), np.float32)
        assert pixels.reshape(3, 28, 28).max() > 1.0  # raw 0-255 pixels, not normalised ones
        export = json.loads((tiny_export / "export.json").read_text())
        label = export["samples"]["digits"]["label"]
        prompt = export["text"]["templates"]["digits"][0].replace("{}", export["tasks"]["digits"]["classnames"][label])
        assert (repo / "digits_text" / "warmup" / "text").read_bytes() == struct.pack("<I", len(prompt)) + (
            prompt.encode())
    accelerator = read_config(tmp_path / "onnxruntime" / "digits_patched").optimization.execution_accelerators
    parameters = dict(accelerator.gpu_execution_accelerator[0].parameters)
    assert parameters == {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
                          "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/cache/trt",
                          "trt_timing_cache_enable": "true", "trt_timing_cache_path": "/cache/trt"}
    write_repository(tiny_export, tmp_path / "cold", RepositoryOptions(warmup=False))
    assert not read_config(tmp_path / "cold" / "digits_patched").model_warmup


def test_warmup_runs_the_sample_before_the_model_is_ready(tiny_export: Path, tmp_path: Path) -> None:
    """Triton runs the warmup request at load: a sample the model refuses fails the start (so a good one ran).
    Triton 2.51 does not just fail that model: a python-backend warmup that raises crashes the server (SIGSEGV),
    which is why the writer warms the preprocessing model only with a sample its limits accept."""
    repo = tmp_path / "repo"
    written = write_repository(tiny_export, repo)
    assert "no warmup" not in written.message  # every backend model, digits_classify's label set included
    models = ["digits_preprocess", "digits_text"]
    with TritonServer(repo, models=models) as server:  # READY after warming up on the real sample and its prompt
        assert server.running()
    (repo / "digits_text" / "warmup" / "text").write_bytes(struct.pack("<I", 2) + b"\xff\xfe")  # not UTF-8
    published_by_hand(repo, "digits_text/warmup/text")
    with pytest.raises(PatcherError, match=r"digits_text failed to load|exited during startup"):
        TritonServer(repo, models=["digits_text"]).start()
    (repo / "digits_preprocess" / "warmup" / "image_bytes").write_bytes(struct.pack("<I", 9) + b"not a png")
    published_by_hand(repo, "digits_preprocess/warmup/image_bytes")
    with pytest.raises(PatcherError, match=r"digits_preprocess failed to load|exited during startup"):
        TritonServer(repo, models=models).start()
    written = write_repository(tiny_export, repo, RepositoryOptions(name="small", limits={"max_pixels": 100}))
    # 28 x 28 refused:
    assert not read_config(repo / "small_preprocess").model_warmup  # no warmup rather than a crash
    assert "no warmup for small_preprocess" in written.message
    assert read_config(repo / "small_patched").model_warmup


def verify(run: Path, served: Served, export: Path, *options: str) -> subprocess.CompletedProcess:
    """`patcher verify RUN --url ... --export EXPORT [options]`."""
    return run_patcher("verify", str(run), "--url", served.grpc_url, "--export", str(export), *options,
                       timeout=600)


def test_verify_passes_on_the_runs_models_and_fails_on_zeroshot_published_as_patched(
        tiny_run: Path, tiny_export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    patcher_triton(tiny_export, repo)
    served = Served(repo, tmp_path / "key.json")
    try:
        passed = verify(tiny_run, served, tiny_export)
        assert passed.returncode == 0, passed.stderr
        assert "verified: digits version 1" in passed.stdout and "fashion-mnist: served" in passed.stdout
        patcher_triton(variant(tiny_export, tmp_path / "swapped", swap=True), repo)
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(served.grpc_url)
        wait_for_version(client, entry_models(tiny_export), "2", 120)
        client.close()
        failed = verify(tiny_run, served, tiny_export, "--limit", "100")  # the full sets passed above
        assert failed.returncode == 2, failed.stdout + failed.stderr
        line = the_error_line(failed.stderr)
        assert "digits version 2" in line and "digits_patched serves zeroshot" in line, line
    finally:
        assert served.stop() == 0


def test_sample_images_are_real_heldout_images(tiny_export: Path) -> None:
    image = Image.open(tiny_export / "samples" / "digits.png")
    assert image.size == (28, 28) and image.mode == "RGB" and np.asarray(image).std() > 10
