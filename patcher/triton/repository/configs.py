"""Triton model configurations, built with Triton's own model_config protobuf and written as config.pbtxt."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.base.files import write_text
from patcher.triton.repository.export_info import TensorSpec

CONFIG_FILE = "config.pbtxt"
BACKENDS = ("python", "onnxruntime")
IMAGE_BYTES = "image_bytes"
NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}  # the float types the image inputs may have
ENTRY_PARAMETER = "patcher_entry"  # which `patcher triton --name` entry a model belongs to


@dataclass(frozen=True)
class Batching:
    """How Triton batches and places one model: sizes, queue delay, instance count, and whether the classifiers'
    instances run on the GPU (KIND_GPU: one group of `instances` on each GPU; the python backend's model.py then
    runs onnxruntime's CUDA provider)."""

    max_batch_size: int = 64
    instances: int = 1
    preferred_batch_sizes: Sequence[int] = field(default_factory=tuple)
    max_queue_delay_us: int = 0
    gpu: bool = False


@dataclass(frozen=True)
class TensorRT:
    """onnxruntime's TensorRT execution provider on a GPU: precision, builder workspace, engine and timing caches.

    `cache` is a folder on the server's host (a volume that outlives the pod): engines built once are reused by
    every later load of the same graph, instead of being rebuilt for minutes.
    """

    fp16: bool = False
    workspace_bytes: int | None = None
    cache: str | None = None

    def parameters(self) -> dict[str, str]:
        """The accelerator's parameters as onnxruntime_backend names them."""
        parameters = {"precision_mode": "FP16" if self.fp16 else "FP32"}
        if self.workspace_bytes:
            parameters["max_workspace_size_bytes"] = str(self.workspace_bytes)
        if self.cache:
            parameters.update(trt_engine_cache_enable="true", trt_engine_cache_path=self.cache,
                              trt_timing_cache_enable="true", trt_timing_cache_path=self.cache)
        return parameters


@dataclass(frozen=True, kw_only=True)
class Tensors:
    """What a model takes and gives: the image input (`image_format` FORMAT_NCHW declares it an image, as Triton's
    image-classification clients expect), the outputs, and the labels file of each labelled output."""

    image: TensorSpec
    outputs: Sequence[TensorSpec]
    labels: Mapping[str, str] = field(default_factory=dict)
    image_format: str | None = None


@dataclass(frozen=True)
class Step:
    """One step of an ensemble: the model, and its tensors mapped to the ensemble's (model name -> ensemble name)."""

    model: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]


def _dims(spec: TensorSpec) -> list[int]:
    return list(spec.shape[1:])


def _parameters(config: mc.ModelConfig, parameters: Mapping[str, Any]) -> None:
    for key, value in parameters.items():
        text = value if isinstance(value, str) else json.dumps(value)
        config.parameters[key].string_value = text


def _batched(config: mc.ModelConfig, batching: Batching, kind: int) -> None:
    config.max_batch_size = batching.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.instance_group.add(kind=kind, count=batching.instances)
    config.version_policy.latest.num_versions = 1  # a new version is served once ready, the old one until then


def _add_input(config: mc.ModelConfig, spec: TensorSpec, image_format: str | None = None) -> None:
    tensor = config.input.add(name=spec.name, data_type=mc.DataType.Value(spec.data_type), dims=_dims(spec))
    if image_format is not None:
        tensor.format = mc.ModelInput.Format.Value(image_format)


def _add_tensors(config: mc.ModelConfig, tensors: Tensors) -> None:
    _add_input(config, tensors.image, tensors.image_format)
    for spec in tensors.outputs:
        output = config.output.add(name=spec.name, data_type=mc.DataType.Value(spec.data_type), dims=_dims(spec))
        if spec.name in tensors.labels:
            output.label_filename = tensors.labels[spec.name]


def classifier_config(name: str, tensors: Tensors, backend: str, batching: Batching, parameters: Mapping[str, Any],
                      tensorrt: TensorRT | None = None) -> mc.ModelConfig:
    """An ONNX classifier: platform onnxruntime_onnx (NVIDIA's container) or python backend running onnxruntime."""
    if backend not in BACKENDS:
        raise PatcherError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    config = mc.ModelConfig(name=name)
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        kind = mc.ModelInstanceGroup.KIND_GPU if tensorrt or batching.gpu else mc.ModelInstanceGroup.KIND_AUTO
    else:
        config.backend = "python"
        kind = mc.ModelInstanceGroup.KIND_GPU if batching.gpu else mc.ModelInstanceGroup.KIND_CPU
    _batched(config, batching, kind)
    _add_tensors(config, tensors)
    if tensorrt is not None:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update(tensorrt.parameters())
    _parameters(config, parameters)
    return config


def preprocess_config(
    name: str, image: TensorSpec, batching: Batching, parameters: Mapping[str, Any]
) -> mc.ModelConfig:
    """The python-backend model that turns encoded image bytes [1] into the classifier's input tensor."""
    config = mc.ModelConfig(name=name, backend="python")
    _batched(config, batching, mc.ModelInstanceGroup.KIND_CPU)
    config.input.add(name=IMAGE_BYTES, data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name=image.name, data_type=mc.DataType.Value(image.data_type), dims=_dims(image))
    _parameters(config, parameters)
    return config


def ensemble_config(name: str, tensors: Tensors, steps: Sequence[Step], max_batch_size: int,
                    parameters: Mapping[str, Any]) -> mc.ModelConfig:
    """An ensemble: the image in, `steps` in order, the outputs (labelled where `tensors.labels` names a file) out."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    _add_tensors(config, tensors)
    for step in steps:
        config.ensemble_scheduling.step.add(model_name=step.model, model_version=-1, input_map=dict(step.inputs),
                                            output_map=dict(step.outputs))
    _parameters(config, parameters)
    return config


def config_text(config: mc.ModelConfig) -> str:
    """The config.pbtxt text of a model configuration."""
    return text_format.MessageToString(config)


def write_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    """Write `model_dir/config.pbtxt` whole or not at all."""
    path = Path(model_dir) / CONFIG_FILE
    write_text(path, config_text(config))
    return path


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt (or a model directory's) into Triton's ModelConfig; PatcherError if malformed."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as error:
        raise PatcherError(f"cannot read Triton config {path}: {error}") from None
    return parse_config(text, str(path))


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """Parse the text of a config.pbtxt (read from `where`); PatcherError if malformed."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as error:
        raise PatcherError(f"cannot read Triton config {where}: {error}") from None


def parameter(config: mc.ModelConfig, key: str) -> str | None:
    """A string parameter of a configuration, None when unset."""
    return config.parameters[key].string_value if key in config.parameters else None
