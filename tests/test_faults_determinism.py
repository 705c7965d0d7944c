"""The same inputs and seed write the same bytes: safetensors with sorted metadata, the same build twice, the same
run exported twice. manifest.json, train.log and export.json also carry times by design (created, timings_s,
elapsed_s); apart from those fields they are equal too."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import torch
from faults_support import BUILD, ForkedCLI, assert_complete_export, assert_complete_run
from safetensors.torch import load_file, save

from patcher.runs.tensorfile import read_header, save_tensors

pytestmark = pytest.mark.slow
TIMES = ("created", "timings_s")


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"visual.w": torch.randn(4, 3, generator=generator), "heads.a": torch.randn(3, 2, generator=generator),
            "half": torch.randn(5, generator=generator).half(), "steps": torch.arange(3), "flag": torch.tensor(True),
            "bf": torch.randn(2, generator=generator).bfloat16(), "empty": torch.zeros(0, 2)}


def test_save_tensors_writes_what_safetensors_reads_and_its_own_bytes_for_one_key(tmp_path: Path) -> None:
    save_tensors(tensors(), tmp_path / "a.safetensors", {"model": "patched"})
    assert (tmp_path / "a.safetensors").read_bytes() == save(tensors(), metadata={"model": "patched"})
    loaded = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors().items())
    assert read_header(tmp_path / "a.safetensors")[0] == {"model": "patched"}


def test_two_metadata_keys_give_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """The Rust writer orders two or more metadata keys by a per-process random hash; ours sorts them."""
    script = ("import sys, torch, hashlib; from patcher.runs.tensorfile import save_tensors; "
              "save_tensors({'w': torch.arange(6.0)}, sys.argv[1], {'model': 'patched', 'alpha': '0.6', 'z': '1'}); "
              "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{n}.st")], capture_output=True,
                              text=True, check=True).stdout for n in range(3)}
    assert len(digests) == 1


@pytest.fixture(scope="module")
def twice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The same build (same name, seed, options) into two folders, and exports: run a twice, run b once."""
    root = tmp_path_factory.mktemp("twice")
    cli = ForkedCLI(root)
    paths = {"a": root / "a" / "run", "b": root / "b" / "run"}
    try:
        for path in paths.values():
            code, stderr = cli.run(*BUILD, "--out", str(path))
            assert code == 0, stderr
        for name, (run, out) in {"a1": (paths["a"], root / "a1"), "a2": (paths["a"], root / "a2"),
                                 "b1": (paths["b"], root / "b1")}.items():
            code, stderr = cli.run("export", str(run), "--out", str(out))
            assert code == 0, stderr
            paths[name] = out
        yield paths
    finally:
        cli.close()


def without_times(manifest: dict) -> dict:
    kept = {key: value for key, value in manifest.items() if key not in TIMES}
    kept["files"] = {name: record for name, record in manifest["files"].items() if name != "train.log"}
    return kept


def test_the_same_build_twice_writes_byte_identical_files(twice: dict[str, Path]) -> None:
    a, b = twice["a"], twice["b"]
    hashes_a, hashes_b = assert_complete_run(a), assert_complete_run(b)
    identical = {name for name in hashes_a if name != "train.log"}
    assert {"models/patched.safetensors", "open_clip_config.json", "alpha_curve.png"} <= identical
    assert {name: hashes_a[name] for name in identical} == {name: hashes_b[name] for name in identical}
    manifests = [json.loads((run / "manifest.json").read_text()) for run in (a, b)]
    assert without_times(manifests[0]) == without_times(manifests[1])
    logs = [[{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
             for line in (run / "train.log").read_text().splitlines()] for run in (a, b)]
    assert logs[0] == logs[1] and len(logs[0]) > 1


def stripped(path: Path) -> bytes:
    """An ONNX file's bytes without what names the manifest it came from."""
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != "patcher.run_manifest_sha256"]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def test_exports_are_byte_identical(twice: dict[str, Path]) -> None:
    assert assert_complete_export(twice["a1"]) == assert_complete_export(twice["a2"])  # the same run, twice
    for name in ("patched.onnx", "zeroshot.onnx"):  # the same build twice: only the manifest hash they cite differs
        assert stripped(twice["a1"] / name) == stripped(twice["b1"] / name)
    first, second = ({k: v for k, v in json.loads((twice[key] / "export.json").read_text()).items()
                      if k not in TIMES} for key in ("a1", "a2"))
    assert first == second
