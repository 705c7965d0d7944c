"""The GPU check (bench/gpu_check.py): its CPU smoke run goes through every phase, and the CUDA paths it relies on
(GPU instance groups, onnxruntime providers, the setup's pins) are what a GPU host gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.export.providers import CPU, CUDA, available_providers, execution_providers
from patcher.triton.repository.configs import Batching, Tensors, classifier_config, preprocess_config
from patcher.triton.repository.export_info import TensorSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
PHASES = ("machine", "training", "evaluation", "build_export_parity", "inference", "triton")
IMAGE = TensorSpec("image", "TYPE_FP32", (-1, 3, 28, 28))
LOGITS = [TensorSpec("logits_digits", "TYPE_FP32", (-1, 10))]


@pytest.mark.slow
def test_cpu_smoke_runs_every_phase(tmp_path: Path) -> None:
    """The same code paths as on a GPU, on the tiny model: every phase ends without an error and with figures."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = tmp_path.glob("gpu-cpu-smoke-*.json")
    report = json.loads(result.read_text())
    phases = report["phases"]
    assert [name for name in PHASES if "error" in phases[name] or "skipped" in phases[name]] == []
    runs = phases["training"]["shapes"][0]["runs"]
    assert [run["config"] for run in runs] == ["plain", "checkpointing", "accum4", "checkpointing+accum4"]
    assert all(run["images_per_s"] > 0 for run in runs)
    assert phases["evaluation"]["runs"][0]["images_per_s"] > 0
    assert phases["build_export_parity"]["parity_on_device"]["passed"] is True
    rows = phases["inference"]["rows"]
    assert {row["kind"] for row in rows} == {"torch fp32", "onnxruntime"}
    assert all(row["images_per_s"] > 0 for row in rows)
    assert phases["triton"]["instance_group"]["kind"] == "KIND_CPU"
    assert [row["failed"] for row in phases["triton"]["rows"]] == [0, 0]
    assert all(row["images_per_s"] > 0 for row in phases["triton"]["rows"])
    page = result.with_suffix(".md").read_text()
    assert "## Fine-tuning" in page and "Error" not in page


def test_gpu_instance_group_for_the_python_backend_classifiers() -> None:
    """`gpu` puts a classifier's instances on the GPU (KIND_GPU) for either backend; preprocessing stays on CPU."""
    tensors = Tensors(image=IMAGE, outputs=LOGITS)
    group = classifier_config("m", tensors, "python", Batching(instances=2, gpu=True), {}).instance_group[0]
    assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_GPU, 2)
    cpu = classifier_config("m", tensors, "python", Batching(), {}).instance_group[0]
    assert cpu.kind == mc.ModelInstanceGroup.KIND_CPU
    onnx = classifier_config("m", tensors, "onnxruntime", Batching(gpu=True), {}).instance_group[0]
    assert onnx.kind == mc.ModelInstanceGroup.KIND_GPU
    preprocess = preprocess_config("p", IMAGE, Batching(gpu=True), {}).instance_group[0]
    assert preprocess.kind == mc.ModelInstanceGroup.KIND_CPU


def test_execution_providers_name_the_device() -> None:
    """CPU gets the CPU provider; CUDA gets CUDA (exact float32 when asked) then CPU, or one error line naming the
    package to install where this onnxruntime has no CUDA provider."""
    assert execution_providers("cpu") == [CPU]
    if CUDA not in available_providers():
        with pytest.raises(PatcherError, match="onnxruntime-gpu"):
            execution_providers("cuda")
        return
    first, last = execution_providers("cuda:0", tf32=False)
    assert first == (CUDA, {"device_id": 0, "use_tf32": 0}) and last == CPU


def test_setup_constraints_drop_what_the_gpu_build_replaces(tmp_path: Path) -> None:
    """The setup's constraints keep every pin but those replaced by a GPU build (or kept from the system)."""
    import gpu_check

    written = gpu_check._constraints(("torch", "onnxruntime"), tmp_path).read_text().splitlines()
    original = (ROOT / "constraints.txt").read_text().splitlines()
    dropped = [line for line in original if line not in written]
    assert sorted(dropped) == sorted(line for line in original if line.startswith(("torch==", "onnxruntime==")))
    assert any(line.startswith("torchvision==") for line in written)
    assert gpu_check._pin("onnxruntime") == next(line.split("==")[1] for line in original
                                                  if line.startswith("onnxruntime=="))


def test_torch_runner_returns_host_outputs() -> None:
    """The in-process PyTorch runner gives the graph's outputs for a batch from host memory (CPU here)."""
    import torch

    from patcher.benchmark.inprocess import torch_runner

    layer = torch.nn.Linear(4, 2)
    batch = np.ones((3, 4), dtype=np.float32)
    output = torch_runner(layer, batch)()
    assert torch.allclose(output, layer(torch.ones(3, 4)))
