"""safetensors files with the same bytes for the same tensors: sorted metadata, the Rust writer's tensor order.
(The same build twice and the same run exported twice: `test_faults_kill.py`, which builds the reference.)"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from patcher.base.tensorfile import read_header, save_tensors


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


def test_metadata_is_written_in_one_order_whatever_order_it_is_given_in(tmp_path: Path) -> None:
    """The Rust writer orders two or more metadata keys by a per-process random hash; ours sorts them."""
    save_tensors(tensors(), tmp_path / "a.st", {"model": "patched", "alpha": "0.6", "z": "1"})
    save_tensors(tensors(), tmp_path / "b.st", {"z": "1", "alpha": "0.6", "model": "patched"})
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()
    assert list(read_header(tmp_path / "a.st")[0]) == ["alpha", "model", "z"]
    loaded = load_file(tmp_path / "b.st")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors().items())
