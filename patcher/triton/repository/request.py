"""What `write_repository` is asked (`RepositoryOptions`, checked into the builders' `Options`) and what it answers
(`WrittenEntry`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError
from patcher.export.contract import PRECISIONS
from patcher.triton.imaging import check_limits
from patcher.triton.repository.builders import BUILDERS
from patcher.triton.repository.configs import Batching, TensorRT
from patcher.triton.repository.entry_context import Options
from patcher.triton.repository.openvocab_models import checked_limits

EXTRA_KIND = re.compile(r"[a-z0-9][a-z0-9_]*")


@dataclass(frozen=True, kw_only=True)
class RepositoryOptions:
    """How one export is written as an entry: its name (default: the patch task), backend, batching, precision,
    bounds on images and label sets, onnxruntime threads, extra classifiers, TensorRT, warmup and GPU placement.

    `limits` bounds the images the preprocessing model accepts (max_bytes, max_pixels, max_aspect, jpeg_draft, ...);
    `intra_op_threads` the onnxruntime threads of each classifier (0: onnxruntime's default); `extra_classifiers`
    (kind -> ONNX file with the patched model's tensors) are served beside the entry as `<name>_<kind>`; `tensorrt`
    (or `tensorrt_fp16`) configures onnxruntime's TensorRT provider; `warmup` warms each new version on the export's
    sample image; `open_vocab` bounds the label sets of the open-vocabulary models (max_labels, max_templates,
    label_cache, truncate_prompts, ...); `gpu` puts the classifiers' instances on the GPU (KIND_GPU).
    """

    name: str | None = None
    backend: str = "python"
    max_batch_size: int = 64
    instances: int = 1
    preferred_batch_sizes: Sequence[int] = ()
    max_queue_delay_us: int = 0
    tensorrt_fp16: bool = False
    precision: str = "fp32"
    limits: Mapping[str, Any] | None = None
    intra_op_threads: int = 0
    extra_classifiers: Mapping[str, Path] | None = None
    tensorrt: TensorRT | None = None
    warmup: bool = True
    open_vocab: Mapping[str, Any] | None = None
    gpu: bool = False

    def checked(self) -> Options:
        """The builders' options; PatcherError naming the first bad one."""
        tensorrt = TensorRT(fp16=True) if self.tensorrt_fp16 and self.tensorrt is None else self.tensorrt
        if self.precision not in PRECISIONS:
            raise PatcherError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if tensorrt is not None and self.backend != "onnxruntime":
            raise PatcherError("TensorRT needs --backend onnxruntime (NVIDIA's container on a GPU host)")
        if tensorrt is not None and tensorrt.workspace_bytes is not None and tensorrt.workspace_bytes < 1:
            raise PatcherError(f"the TensorRT workspace must be at least 1 byte, not {tensorrt.workspace_bytes}")
        if self.max_batch_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise PatcherError("max_batch_size and instances must be at least 1, max_queue_delay_us at least 0")
        if self.intra_op_threads < 0:
            raise PatcherError(f"intra_op_threads must be 0 (onnxruntime's default) or more, not "
                               f"{self.intra_op_threads}")
        preferred = sorted(set(self.preferred_batch_sizes))
        if any(size < 1 or size > self.max_batch_size for size in preferred):
            raise PatcherError(f"preferred batch sizes {preferred} must lie in 1..{self.max_batch_size} "
                               "(max_batch_size)")
        extra = self._extra()
        try:
            limits = check_limits(dict(self.limits or {}))
        except (ValueError, TypeError) as error:
            raise PatcherError(f"bad preprocessing limit: {error}") from None
        batching = Batching(max_batch_size=self.max_batch_size, instances=self.instances,
                            preferred_batch_sizes=preferred, max_queue_delay_us=self.max_queue_delay_us, gpu=self.gpu)
        return Options(backend=self.backend, batching=batching, tensorrt=tensorrt, precision=self.precision,
                       limits=limits, intra_op_threads=self.intra_op_threads, extra_classifiers=extra,
                       open_vocab=checked_limits(dict(self.open_vocab) if self.open_vocab is not None else None))

    def _extra(self) -> dict[str, Path]:
        extra = {kind: Path(path) for kind, path in (self.extra_classifiers or {}).items()}
        taken = [kind for kind in extra if kind in BUILDERS or not EXTRA_KIND.fullmatch(kind)]
        if taken:
            raise PatcherError(f"extra classifier kinds {taken} clash with the entry's own kinds or are not a-z, "
                               "0-9, _")
        return extra


@dataclass(frozen=True, kw_only=True)
class WrittenModel:
    """One model of the entry as written: its kind, task (per-task models), the version written, all versions."""

    kind: str
    task: str | None
    version: int
    versions: list[int]


@dataclass(frozen=True, kw_only=True)
class WrittenEntry:
    """What `write_repository` wrote: where, the entry, its version (new or already there), what was recovered from
    an interrupted publish, the journal's serial, the content digest the version is named by, and every model."""

    repository: str
    name: str
    backend: str
    precision: str
    version: int
    new_version: bool
    message: str
    recovered: list[str]
    serial: int
    content_sha256: str
    models: dict[str, WrittenModel] = field(default_factory=dict)


__all__ = ["RepositoryOptions", "WrittenEntry", "WrittenModel"]
