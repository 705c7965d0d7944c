"""Triton python-backend model: prompts (UTF-8 BYTES) in, L2-normalised text embeddings out.

Copied into `<name>_text/<version>/model.py` by `patcher triton`, beside `model.onnx` (the exported text tower),
`patcher_tokenizer.py` (patcher/export/tokenizer.py: open_clip's tokenizer without torch) and the tokenizer's
vocabulary. Its config parameters give the tokenizer (`tokenizer`) and the input limits (`max_prompt_bytes`,
`truncate`: whether a prompt longer than the context is cut as open_clip cuts it, or refused). A refused prompt
fails its own request with INVALID_ARG naming the item and the limit; the batch's other requests are answered.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patcher_tokenizer import ClipTokenizer, PromptError, decode_prompts

INPUT = "text"
OUTPUT = "text_embedding"
MODEL_FILE = "model.onnx"


def _invalid_argument(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # python backends before 23.05 have no codes
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    """Tokenise every prompt of a dynamic batch, run the text tower once, split the embeddings back per request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer and open the text tower with onnxruntime."""
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        spec = json.loads(parameters["tokenizer"])
        self.tokenizer = ClipTokenizer(os.path.join(folder, spec["vocabulary"]), spec["context_length"],
                                       spec["clean"])
        self.max_prompt_bytes = int(parameters["max_prompt_bytes"])
        self.truncate = parameters.get("truncate", "false") == "true"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(folder, MODEL_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: its embeddings, or INVALID_ARG naming the prompt refused and why."""
        tokens: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
            try:
                texts = decode_prompts([bytes(item) for item in items], self.max_prompt_bytes)
                tokens.append(self.tokenizer(texts, truncate=self.truncate, strict=True))
                errors.append(None)
            except PromptError as error:
                tokens.append(None)
                errors.append(str(error))
        valid = [t for t in tokens if t is not None]
        embeddings = np.zeros((0, 0), np.float32)
        if valid:
            try:
                embeddings = self.session.run([OUTPUT], {self.input_name: np.concatenate(valid)})[0]
            except Exception as error:  # onnxruntime errors fail this batch's requests, not the server
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {error}"))
                        for _ in requests]
        responses, start = [], 0
        for request_tokens, error in zip(tokens, errors, strict=True):
            if request_tokens is None:
                responses.append(pb_utils.InferenceResponse(error=_invalid_argument(error)))
                continue
            stop = start + len(request_tokens)
            output = pb_utils.Tensor(OUTPUT, np.ascontiguousarray(embeddings[start:stop]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
            start = stop
        return responses
