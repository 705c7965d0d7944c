"""What the benchmark needs to know about each served model, read from a live server, and the requests it sends."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.benchmark.loadgen import Payload, bytes_payload, shm_payload, tensor_payload
from patcher.triton.client import describe_model
from patcher.triton.repository.configs import NUMPY_TYPES

KIND_SUFFIXES = {"_patched": "patched", "_zeroshot": "zeroshot", "_outensemble": "outensemble",
                 "_patched_int8": "patched_int8"}
BYTES_KIND = "patched-bytes"


@dataclass(frozen=True)
class ServedTarget:
    """A served model as the load generator sees it: input tensor, batch limit, outputs, kind."""

    name: str
    kind: str
    input_name: str
    input_type: str  # Triton config type: TYPE_FP32, TYPE_FP16 or TYPE_STRING
    dims: tuple[int, ...]  # input dims without the batch
    max_batch_size: int
    outputs: int
    image_size: tuple[int, int] | None
    config: dict[str, Any]

    @property
    def takes_bytes(self) -> bool:
        """True for the preprocessing ensemble (encoded images in)."""
        return self.input_type == "TYPE_STRING"


def model_kind(name: str, takes_bytes: bool) -> str:
    """patched, zeroshot or outensemble from the model name's suffix; patched-bytes for an image-bytes ensemble."""
    if takes_bytes:
        return BYTES_KIND
    for suffix, kind in KIND_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return name


def inspect_target(client: Any, url: str, model: str, headers: dict[str, str] | None = None) -> ServedTarget:
    """Read a served model's configuration; PatcherError (listing the server's models, given its key) if it has
    none ready."""
    served = describe_model(client, model, url, headers=headers)
    config = client.get_model_config(model, as_json=True)["config"]
    (tensor,) = config["input"][:1] or [None]
    if tensor is None:
        raise PatcherError(f"{model} on {url} declares no input: it is not a patcher classifier")
    input_type = tensor.get("data_type", "TYPE_FP32")
    if input_type not in (*NUMPY_TYPES, "TYPE_STRING"):
        raise PatcherError(f"{model} takes {input_type} input: bench sends float32/float16 images or encoded bytes")
    if served.max_batch_size < 1:
        raise PatcherError(f"{model} on {url} has max_batch_size 0 (no batching): bench needs a batching model")
    preprocess = served.preprocess or {}
    image_size = tuple(preprocess["image_size"]) if preprocess.get("image_size") else None
    return ServedTarget(
        name=model,
        kind=model_kind(model, input_type == "TYPE_STRING"),
        input_name=tensor["name"],
        input_type=input_type,
        dims=tuple(int(d) for d in tensor.get("dims", [])),
        max_batch_size=served.max_batch_size,
        outputs=len(config.get("output", [])),
        image_size=image_size,  # type: ignore[arg-type]
        config=config,
    )


def check_batches(targets: list[ServedTarget], batch_sizes: list[int], url: str) -> None:
    """PatcherError when a batch size of the sweep exceeds a model's max_batch_size."""
    for target in targets:
        too_big = [b for b in batch_sizes if b > target.max_batch_size]
        if too_big:
            raise PatcherError(
                f"batch size {max(too_big)} exceeds max_batch_size {target.max_batch_size} of {target.name} on {url}: "
                f"use batch sizes up to {target.max_batch_size} or rewrite the repository with a larger "
                "`patcher triton --max-batch-size`"
            )


def server_settings(target: ServedTarget) -> dict[str, Any]:
    """How the server runs a model: backend, instances, dynamic batching, max batch, onnxruntime threads."""
    config = target.config
    groups = config.get("instance_group", [])
    batching = config.get("dynamic_batching")
    parameters = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
    return {
        "backend": config.get("backend") or config.get("platform"),
        "max_batch_size": target.max_batch_size,
        "instances": sum(int(g.get("count", 1)) for g in groups) or None,
        "dynamic_batching": None
        if batching is None
        else {
            "max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0)),
            "preferred_batch_size": [int(s) for s in batching.get("preferred_batch_size", [])],
        },
        "intra_op_threads": parameters.get("intra_op_threads"),
    }


def input_batch(target: ServedTarget, batch: int, seed: int = 0) -> np.ndarray:
    """A deterministic batch of standard-normal images of the model's input shape (cost does not depend on values)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *target.dims)).astype(NUMPY_TYPES[target.input_type])


def encoded_images(target: ServedTarget, batch: int, seed: int = 0) -> list[bytes]:
    """PNG-encoded noise images at the model's input size, for the image-bytes ensemble."""
    from PIL import Image

    height, width = target.image_size or (224, 224)
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(batch):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    return blobs


def payload(target: ServedTarget, batch: int, shm_region: str | None = None) -> Payload:
    """The request the load generator sends to a model at a batch size (inline, shared-memory or encoded bytes)."""
    if target.takes_bytes:
        return bytes_payload(target.name, target.input_name, encoded_images(target, batch), target.outputs)
    array = input_batch(target, batch)
    if shm_region is not None:
        return shm_payload(target.name, target.input_name, array, shm_region, target.outputs)
    return tensor_payload(target.name, target.input_name, array, target.outputs)


def describe(targets: list[ServedTarget]) -> dict[str, Any]:
    """The report's record of the served models."""
    return {
        t.name: {"kind": t.kind, "input": t.input_name, "input_type": t.input_type, "dims": list(t.dims),
                 **server_settings(t)}
        for t in targets
    }
