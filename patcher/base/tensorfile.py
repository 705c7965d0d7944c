"""safetensors files written byte for byte the same from the same tensors, and their headers read without loading.

The Rust writer behind `safetensors.torch.save_file` serialises `__metadata__` from a hash map, so two or more
metadata keys come out in an order that varies from process to process (and so does the file's sha256). This
writer emits the same format (8-byte little-endian header length, JSON header padded with spaces to 8 bytes,
then each tensor's little-endian bytes) with the metadata first, keys sorted, and tensors in the Rust writer's
order (by dtype, then name), so with one metadata key the bytes equal `save_file`'s; any
safetensors reader loads it. Its writes are plain Python file writes, so a full disk raises OSError(ENOSPC).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patcher.base.errors import PatcherError
from patcher.base.faults import naming

if TYPE_CHECKING:
    import torch


@cache
def _dtypes() -> dict[Any, str]:
    import torch  # only writers need it: reading a header imports no torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL",
    }
# The Rust writer's order of dtypes (its enum); it stores tensors by dtype, largest first, then by name.
_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
ALIGNMENT = 8
MAX_HEADER = 100 << 20  # the readers' own limit


def _ordered(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    for name, tensor in tensors.items():
        if tensor.dtype not in _dtypes():
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors does not store")
    return sorted(tensors, key=lambda name: (-_ORDER.index(_dtypes()[tensors[name].dtype]), name))


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in _ordered(tensors):
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _dtypes()[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    return header + b" " * (-len(header) % ALIGNMENT)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in row-major little-endian order (what safetensors stores)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path | str,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) to a safetensors file, deterministically."""
    header = _header(tensors, metadata)
    with naming(path), open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for name in _ordered(tensors):
            handle.write(tensor_bytes(tensors[name]))


def read_header(path: Path | str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(metadata, {tensor name: {"dtype", "shape", "data_offsets"}}) of a safetensors file, reading only its header.

    PatcherError when the file is not a well-formed safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            raise PatcherError(f"{path} is not a safetensors file (bad header length): rebuild the run")
        try:
            entries = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PatcherError(f"{path} has an unreadable safetensors header ({error}): rebuild the run") from None
    if not isinstance(entries, dict):
        raise PatcherError(f"{path} has a malformed safetensors header: rebuild the run")
    metadata = entries.pop("__metadata__", None) or {}
    return dict(metadata), entries
