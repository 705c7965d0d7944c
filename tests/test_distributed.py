"""Data-parallel builds with torchrun (gloo, 2 processes on this CPU): one run, the one-process result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults_support import run_patcher
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"
BUILD = ["build", "--task", "digits", "--support", "count-objects", "--model", "patcher-tiny", "--pretrained",
         "none", "--batch-size", "32", "--lr", "1e-4", "--warmup-steps", "2", "--alpha", "0.5"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _one(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_patcher(*BUILD, "--out", str(out), *extra, env=_env())


def _torchrun(out: Path, *extra: str, processes: int = 2) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", str(processes), "-m", "patcher", *BUILD,
            "--out", str(out), *extra]


# flyp: its contrastive loss gathers features over ranks and it trains both towers, so it takes the whole CLI path
# that ft would (ft, flyp and carft on two ranks against one process: the micro-batch test below)
@pytest.mark.parametrize("method", ["flyp"])
def test_two_processes_write_one_run_equal_to_one_process(tmp_path: Path, method: str):
    """Same global batch and seed: the fine-tuned weights agree to 1e-4, whatever the workers and data mode."""
    single = _one(tmp_path / "one", "--steps", "8", "--method", method)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(_torchrun(tmp_path / "two", "--steps", "8", "--method", method, "--workers", "1",
                                      "--data-mode", "stream"),
                            capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert double.returncode == 0, double.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run, nothing half-written beside it
    assert double.stdout.count("run: ") == 1  # rank 0 reports; rank 1 stays quiet
    one, two = (load_file(str(tmp_path / name / "models" / "finetuned.safetensors")) for name in ("one", "two"))
    zeroshot = load_file(str(tmp_path / "one" / "models" / "zeroshot.safetensors"))
    moved = max((one[key] - zeroshot[key]).abs().max().item() for key in one)
    assert moved > 1e-4  # training really changed the weights, so the comparison means something
    assert max((one[key] - two[key]).abs().max().item() for key in one) <= 1e-4
    if method == "flyp":  # the text tower too
        one, two = (load_file(str(tmp_path / name / "text" / "finetuned.safetensors")) for name in ("one", "two"))
        assert max((one[key].float() - two[key].float()).abs().max().item() for key in one) <= 1e-4
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two")]
    assert [m["training"]["world_size"] for m in manifests] == [1, 2]
    assert manifests[0]["test_accuracy"]["zeroshot"] == manifests[1]["test_accuracy"]["zeroshot"]


def test_micro_batches_on_two_processes_give_the_one_process_step_of_the_whole_batch(tmp_path: Path):
    """torchrun, 2 ranks x 4 micro-batches of 8 against one process with the batch of 64 in one pass: ft, flyp
    (features gathered over ranks and cached over micro-batches) and carft agree within 1e-5 after 4 steps (float64,
    as tests/test_finetune_scale.py explains); each rank chose the same few-shot images."""
    from scale_support import fine_tune, max_difference, tiny_setup

    worker = Path(__file__).parent / "accumulation_worker.py"
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(worker), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("ft", "flyp", "carft"):
        two = load_file(str(tmp_path / f"{method}.safetensors"))
        one = fine_tune(method, tiny_setup(torch.float64, accum_steps=1))
        assert max_difference(one, two) <= 1e-5, method
    assert json.loads((tmp_path / "shots-0.json").read_text()) == json.loads((tmp_path / "shots-1.json").read_text())


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_rank_killed_mid_training_ends_every_rank(tmp_path: Path):
    process = subprocess.Popen(_torchrun(tmp_path / "run", "--steps", "100000"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        ranks: list[int] = []
        while time.monotonic() < deadline and not (tmp_path / ".run.partial" / "checkpoints").exists():
            time.sleep(0.5)
        ranks = _children(process.pid)
        assert len(ranks) == 2, "torchrun should run two ranks"
        time.sleep(2)  # into the training loop
        os.kill(ranks[1], signal.SIGKILL)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert all(not Path(f"/proc/{rank}").exists() or "Z" in Path(f"/proc/{rank}/stat").read_text().split()[2]
               for rank in ranks)
    assert not (tmp_path / "run").exists()  # nothing that looks complete


def test_the_library_entry_point_builds_with_its_own_defaults(tmp_path: Path):
    """`build(BuildOptions(task=..., model=...))`: no TrainConfig given, the method's defaults apply."""
    from patcher.stages.build import BuildOptions, build

    torch.manual_seed(0)
    out = build(BuildOptions(task="digits", model="patcher-tiny", pretrained=None, epochs=0.1, out=tmp_path / "r"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["lr"] == 1e-5 and manifest["training"]["batch_size"] == 128
    assert manifest["training"]["total_steps"] == 1  # 0.1 epochs of ~540 images at batch 128
