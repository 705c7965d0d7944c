"""Is a served model's backend alive? Its stub processes, its failure count, and a one-item probe request."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from patcher.triton.serving.processes import stub_processes

DEAD_BACKEND = ("is not healthy", "Stub process")  # how Triton 2.51 answers for a python model whose stub died
NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT32": np.int32,
         "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}


def tiny_png() -> bytes:
    """A valid 2 x 2 PNG, the probe's input for models that take encoded images."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def probe_inputs(config: dict[str, Any]) -> list[Any]:
    """One-item inputs for a model, from its config (JSON form): zeros, or a tiny PNG for BYTES inputs."""
    import tritonclient.grpc as grpcclient

    batched = int(config.get("max_batch_size", 0)) > 0
    inputs = []
    for tensor in config.get("input", []):
        dims = [max(1, int(d)) for d in tensor.get("dims", [])]
        shape = [1, *dims] if batched else dims
        if tensor.get("data_type") == "TYPE_STRING":
            array = np.full(shape, tiny_png(), dtype=np.object_)
            datatype = "BYTES"
        else:
            array = np.zeros(shape, NUMPY.get(tensor.get("data_type", "TYPE_FP32"), np.float32))
            datatype = tensor.get("data_type", "TYPE_FP32").removeprefix("TYPE_")
        item = grpcclient.InferInput(tensor["name"], shape, datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def probe(client: Any, model: str, config: dict[str, Any], timeout_s: float = 20.0) -> str | None:
    """Send the model one tiny request: None if it answered, else the server's error message."""
    from tritonclient.utils import InferenceServerException

    try:
        client.infer(model, probe_inputs(config), client_timeout=timeout_s)
    except InferenceServerException as error:
        return error.message() or str(error)
    return None


def backend_died(message: str | None) -> bool:
    """True when a failed request says the model's backend process is gone."""
    return message is not None and all(part in message for part in DEAD_BACKEND)


def instance_count(config: dict[str, Any]) -> int:
    """Backend instances a (python-backend) model runs: the sum of its instance groups' counts."""
    return sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1


@dataclass
class Suspects:
    """Which python-backend models look unwell since the last look: too few stubs, or new failed requests."""

    failures: dict[str, int]

    def find(self, client: Any, pgid: int, configs: dict[str, dict[str, Any]]) -> list[str]:
        """Models with fewer live stubs than instances, or whose failed-request count grew since the last call."""
        alive: dict[str, int] = {}
        for stub in stub_processes(pgid):
            alive[stub.model] = alive.get(stub.model, 0) + 1
        suspects = []
        for model, config in configs.items():
            if config.get("backend") != "python":
                continue
            failed = _fail_count(client, model)
            grew = failed > self.failures.get(model, failed)
            self.failures[model] = failed
            if grew or alive.get(model, 0) < instance_count(config):
                suspects.append(model)
        return suspects


def _fail_count(client: Any, model: str) -> int:
    from tritonclient.utils import InferenceServerException

    try:
        stats = client.get_inference_statistics(model, as_json=True)
    except InferenceServerException:
        return 0
    return sum(int(s.get("inference_stats", {}).get("fail", {}).get("count", 0)) for s in stats.get("model_stats", []))
