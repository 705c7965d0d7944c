"""Triton python-backend model: encoded images (JPEG, PNG, PPM, ...) in, CLIP-preprocessed tensors out.

Copied into `<name>_preprocess/<version>/model.py` by `patcher triton`; it reads the preprocessing (`preprocess`)
and the input limits (`limits`) from its config.pbtxt parameters. Every image is checked from its header
before anything is decoded (encoded bytes, pixel count, aspect ratio), JPEGs much larger than the model need
are decoded at reduced scale (`Image.draft`), and a refused or undecodable image fails its request with
INVALID_ARG, naming the limit or the reason. The image functions are patcher_imaging.py, copied beside this
file from patcher/triton/imaging.py.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patcher_imaging import DecodeBudget, check_limits, preprocess_bytes

INPUT = "image_bytes"
OUTPUT = "image"


def _error(message: str, code_name: str) -> Any:
    code = getattr(pb_utils.TritonError, code_name, None)  # python backends before 23.05 have no codes
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    """Decode and preprocess every image of every request in a dynamic batch; bad bytes fail only their request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the preprocessing and the input limits from this model's config parameters."""
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.spec = json.loads(parameters["preprocess"]["string_value"])
        limits = parameters.get("limits", {}).get("string_value")
        self.limits = check_limits(json.loads(limits) if limits else {})
        self.budget = DecodeBudget.from_environment(self.limits)  # shared by the server's stubs under patcher serve

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: the preprocessed batch, or INVALID_ARG naming the image refused and why."""
        responses = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
            try:
                batch = preprocess_bytes([bytes(item) for item in items], self.spec, self.limits, self.budget)
            except ValueError as error:
                responses.append(pb_utils.InferenceResponse(error=_error(str(error), "INVALID_ARG")))
                continue
            except Exception as error:  # the server's decoding budget taken (ServerBusy), memory: this request only
                responses.append(pb_utils.InferenceResponse(error=_error(f"{type(error).__name__}: {error}",
                                                                         "UNAVAILABLE")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, batch)]))
        return responses
