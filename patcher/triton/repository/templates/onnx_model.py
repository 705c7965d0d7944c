"""Triton python-backend model: runs `model.onnx` (next to this file) with onnxruntime.

Copied into `<name>_patched/<version>/model.py` and `<name>_zeroshot/<version>/model.py` by `patcher triton`,
for servers without the onnxruntime backend (the tritonserver bundled in nvidia-pytriton). Requests of
one dynamic batch are concatenated, run in one session call and split back per request.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

MODEL_FILE = "model.onnx"


class TritonPythonModel:
    """One onnxruntime InferenceSession per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open `model.onnx` of this version with onnxruntime (threads from the config's intra_op_threads)."""
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], MODEL_FILE)
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run the batch's requests in one session call; each response carries the outputs its request asked for."""
        inputs = {
            name: [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for request in requests]
            for name in self.input_names
        }
        sizes = [len(array) for array in inputs[self.input_names[0]]]
        feed = {name: np.concatenate(arrays) if len(arrays) > 1 else arrays[0] for name, arrays in inputs.items()}
        try:
            results = self.session.run(self.output_names, feed)
        except Exception as error:  # onnxruntime errors fail this batch's requests, not the server
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {error}")) for _ in requests]
        offsets = np.cumsum([0, *sizes])
        responses = []
        for index, request in enumerate(requests):
            wanted = set(request.requested_output_names()) or set(self.output_names)
            start, stop = offsets[index], offsets[index + 1]
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[start:stop]))
                for name, result in zip(self.output_names, results, strict=True)
                if name in wanted
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
