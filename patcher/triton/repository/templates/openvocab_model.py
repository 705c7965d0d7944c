"""Triton python-backend model: open-vocabulary classification with a label set given in the request.

Copied into `<name>_classify/<version>/model.py` by `patcher triton`, beside `model.onnx` (the patched image graph),
`patcher_imaging.py` (the preprocessing model's image path) and `patcher_openvocab.py` (label sets, heads, the
cache). A request holds `image_bytes` [N, 1] (encoded images), `labels` [L] and optionally `templates` [T] (each
with one `{}`; the label itself is the prompt without them), all UTF-8 BYTES, and gets `scores` [N, L]: the logits
`normalize(image embedding) @ head`, as the baked tasks' are, `probabilities` [N, L] (their softmax over the
request's labels) and `classification` [N, L] (BYTES "probability:index:label", most probable first). A label
set's head is computed once, by the entry's text model (`<name>_text`, called through BLS), and cached (bounded,
keyed by labels and templates), so that a repeated label set costs one matrix product. Bad input fails its
request with INVALID_ARG naming the item and the limit.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patcher_imaging import DecodeBudget, ServerBusy, check_limits, preprocess_bytes
from patcher_openvocab import (
    MAX_PROMPTS,
    HeadCache,
    LabelSet,
    LabelSetError,
    check_label_set,
    class_heads,
    probabilities,
    ranked_labels,
)

IMAGES, LABELS, TEMPLATES, SCORES = "image_bytes", "labels", "templates", "scores"
PROBABILITIES, CLASSIFICATION = "probabilities", "classification"
MODEL_FILE = "model.onnx"
WARM_HEAD_FILE = "warm_head.npz"
TEXT_INPUT, TEXT_OUTPUT = "text", "text_embedding"
ITEM = re.compile(r"item (\d+): (.*)", re.DOTALL)


def _error(message: str, code_name: str) -> Any:
    code = getattr(pb_utils.TritonError, code_name, None)  # python backends before 23.05 have no codes
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class RequestRefused(ValueError):
    """Bad input of one request: INVALID_ARG with this message."""


class TritonPythonModel:
    """One onnxruntime session of the image graph; label-set heads from the text model, cached."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the preprocessing, limits and logit scale from the config; open the image graph."""
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.spec = json.loads(parameters["preprocess"])
        self.limits = check_limits(json.loads(parameters.get("limits") or "{}"))
        self.budget = DecodeBudget.from_environment(self.limits)  # shared with the preprocessing stubs
        self.logit_scale = float(parameters["logit_scale"])
        self.text_model = parameters["text_model"]
        self.text_batch = int(parameters["text_batch"])
        self.max_labels = int(parameters["max_labels"])
        self.max_templates = int(parameters["max_templates"])
        self.max_prompts = int(parameters.get("max_prompts", MAX_PROMPTS))
        self.max_images = int(parameters["max_images"])
        self.cache = HeadCache(int(parameters["label_cache"]))
        warm = os.path.join(args["model_repository"], args["model_version"], WARM_HEAD_FILE)
        if os.path.isfile(warm):  # the task's own label set and its head, from `patcher triton`: what warmup asks
            with np.load(warm, allow_pickle=False) as saved:
                templates = [str(t) for t in saved["templates"]] or None
                label_set = check_label_set([str(label) for label in saved["labels"]], templates, self.max_labels,
                                            self.max_templates)
                self.cache.put(label_set, np.ascontiguousarray(saved["head"], dtype=np.float32))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], MODEL_FILE)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: scores, probabilities and ranked labels [N, L], or that request's error alone."""
        responses = []
        for request in requests:
            try:
                scores, label_set = self.classify(request)
            except RequestRefused as error:
                responses.append(pb_utils.InferenceResponse(error=_error(str(error), "INVALID_ARG")))
                continue
            except ServerBusy as error:  # the server's decoding budget stayed taken: this request only, try again
                responses.append(pb_utils.InferenceResponse(error=_error(f"ServerBusy: {error}", "UNAVAILABLE")))
                continue
            except Exception as error:  # a failure of this request (the text model, onnxruntime), not the server
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=self.outputs(request, scores, label_set)))
        return responses

    def outputs(self, request: Any, scores: np.ndarray, label_set: LabelSet) -> list[Any]:
        """The outputs the request asked for (all when it named none): the ranked strings cost N x L Python strings."""
        wanted = set(request.requested_output_names()) or {SCORES, PROBABILITIES, CLASSIFICATION}
        outputs = [pb_utils.Tensor(SCORES, scores)] if SCORES in wanted else []
        if wanted & {PROBABILITIES, CLASSIFICATION}:
            probs = probabilities(scores)
            if PROBABILITIES in wanted:
                outputs.append(pb_utils.Tensor(PROBABILITIES, probs))
            if CLASSIFICATION in wanted:
                outputs.append(pb_utils.Tensor(CLASSIFICATION, ranked_labels(probs, label_set.labels)))
        return outputs

    def classify(self, request: Any) -> tuple[np.ndarray, LabelSet]:
        """The scores of one request's images against its label set, and that label set."""
        label_set = self.label_set(request)
        images = pb_utils.get_input_tensor_by_name(request, IMAGES).as_numpy().reshape(-1)
        if len(images) == 0 or len(images) > self.max_images:
            raise RequestRefused(f"{len(images)} images: send 1 to max_images={self.max_images} per request")
        try:
            batch = preprocess_bytes([bytes(item) for item in images], self.spec, self.limits, self.budget)
        except ValueError as error:
            raise RequestRefused(str(error)) from None
        head = self.cache.get(label_set)
        if head is None:
            head = self.head(label_set)
            self.cache.put(label_set, head)
        embedding = self.session.run(["embedding"], {"image": batch})[0]
        return np.ascontiguousarray(embedding.astype(np.float32) @ head), label_set

    def label_set(self, request: Any) -> LabelSet:
        """The request's labels and templates, checked."""
        labels = pb_utils.get_input_tensor_by_name(request, LABELS).as_numpy().reshape(-1)
        given = pb_utils.get_input_tensor_by_name(request, TEMPLATES)
        templates = None if given is None else [bytes(t) for t in given.as_numpy().reshape(-1)]
        try:
            return check_label_set([bytes(label) for label in labels], templates, self.max_labels, self.max_templates,
                                   self.max_prompts)
        except LabelSetError as error:
            raise RequestRefused(str(error)) from None

    def head(self, label_set: LabelSet) -> np.ndarray:
        """The label set's [D, L] head: its prompts embedded by the text model, in chunks of its batch size."""
        prompts = label_set.prompts()
        chunks = []
        for start in range(0, len(prompts), self.text_batch):
            part = np.array([p.encode("utf-8") for p in prompts[start : start + self.text_batch]],
                            dtype=np.object_).reshape(-1, 1)
            request = pb_utils.InferenceRequest(model_name=self.text_model, requested_output_names=[TEXT_OUTPUT],
                                                inputs=[pb_utils.Tensor(TEXT_INPUT, part)])
            response = request.exec()
            if response.has_error():
                message = response.error().message()
                item = ITEM.search(message)
                if item is None:
                    raise RuntimeError(f"{self.text_model}: {message}")
                raise RequestRefused(f"{label_set.source(start + int(item.group(1)))}: {item.group(2)}")
            chunks.append(pb_utils.get_output_tensor_by_name(response, TEXT_OUTPUT).as_numpy())
        return class_heads(np.concatenate(chunks), len(label_set.labels), len(label_set.templates),
                           self.logit_scale)
