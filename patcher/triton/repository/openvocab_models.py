"""The open-vocabulary models of an entry whose export has a text tower: one builder per model kind.

    <name>_text       python: prompts (UTF-8 BYTES [N, 1]) -> text_embedding [N, D] (the patched model's text tower)
    <name>_embed      ensemble in NVIDIA's image conventions: raw 0-255 pixels [N, 3, H, W], FORMAT_NCHW ->
                      embedding [N, D] (through <name>_pixels)
    <name>_classify   python: image_bytes [N, 1], labels [L], optional templates [T] -> scores, probabilities and
                      classification ("probability:index:label", ranked) [N, L]; a label
                      set's head comes from <name>_text (BLS) and is cached
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

import patcher.export.openvocab as label_sets
import patcher.export.tokenizer as tokenizer
from patcher.base.errors import PatcherError
from patcher.base.records import to_json
from patcher.export.contract import EMBEDDING_OUTPUT, TEXT_OUTPUT, TextExport
from patcher.triton.repository.configs import IMAGE_BYTES, Step, Tensors, classifier_config, ensemble_config
from patcher.triton.repository.entry import Model
from patcher.triton.repository.entry_context import IMAGE_FORMAT, EntryContext, ModelPlan, python_model
from patcher.triton.repository.export_info import TensorSpec
from patcher.triton.repository.pixels import PIXELS_INPUT

TEXT_INPUT = "text"  # the served text model's input: prompts, not token ids
LABELS, TEMPLATE_INPUT, SCORES = "labels", "templates", "scores"
TOKENIZER_FILE = "patcher_tokenizer.py"  # the names the python models import them by
OPENVOCAB_FILE = "patcher_openvocab.py"
MAX_PROMPT_BYTES = label_sets.MAX_PROMPT_BYTES
# What `patcher triton` takes for the open-vocabulary models (flags of the same names), checked by `checked_limits`
OPEN_VOCAB_LIMITS: dict[str, Any] = {**label_sets.DEFAULT_LIMITS, "truncate_prompts": False, "classify_instances": 0}


def checked_limits(limits: dict[str, Any] | None) -> dict[str, Any]:
    """The open-vocabulary limits with defaults filled in; PatcherError naming a bad one."""
    merged = {**OPEN_VOCAB_LIMITS, **(limits or {})}
    unknown = sorted(set(merged) - set(OPEN_VOCAB_LIMITS))
    if unknown:
        raise PatcherError(f"unknown open-vocabulary limit {unknown[0]!r}: use {', '.join(OPEN_VOCAB_LIMITS)}")
    for key in ("max_labels", "max_templates", "max_prompts"):
        if not isinstance(merged[key], int) or merged[key] < 1:
            raise PatcherError(f"--{key.replace('_', '-')} must be at least 1, not {merged[key]!r}")
    if not isinstance(merged["classify_instances"], int) or merged["classify_instances"] < 0:
        raise PatcherError(f"--classify-instances must be 0 (as --instances) or more, not "
                           f"{merged['classify_instances']!r}")
    if not isinstance(merged["label_cache"], int) or merged["label_cache"] < 0:
        raise PatcherError(f"--label-cache must be 0 (no cache) or more, not {merged['label_cache']!r}")
    merged["truncate_prompts"] = bool(merged["truncate_prompts"])
    return merged


def _text(context: EntryContext) -> TextExport:
    text = context.info.record.text
    if text is None:
        raise PatcherError(f"{context.info.path} has no text tower: run `patcher export` again")
    return text


def _threads(context: EntryContext) -> dict[str, str]:
    threads = context.options.intra_op_threads
    return {"intra_op_threads": str(threads)} if threads else {}


def _source(module: Any) -> str:
    return Path(module.__file__).read_text()


def build_text(context: EntryContext, model: Model) -> ModelPlan:
    """Prompts in, the patched model's text embeddings out: tokenised in the model with open_clip's tokenizer."""
    text = _text(context)
    limits = context.options.open_vocab
    width = int(text.output.shape[1])
    parameters = {**context.common(), "tokenizer": to_json(text.tokenizer), "max_prompt_bytes": str(MAX_PROMPT_BYTES),
                  "truncate": limits["truncate_prompts"], "logit_scale": repr(text.models["patched"].logit_scale),
                  **_threads(context)}
    # its model.py runs onnxruntime on the CPU: the instance group says so even where the classifiers use a GPU
    batching = dataclasses.replace(context.options.batching, gpu=False)
    tensors = Tensors(image=TensorSpec(TEXT_INPUT, "TYPE_STRING", (-1, 1)),
                      outputs=[TensorSpec(TEXT_OUTPUT, "TYPE_FP32", (-1, width))])
    config = classifier_config(model.name, tensors, "python", batching, parameters)
    vocabulary = context.info.vocabulary_file()
    return context.plan(model, config, {"model.onnx": context.info.text_file("patched"),
                                        **python_model("text_model.py"), TOKENIZER_FILE: _source(tokenizer),
                                        vocabulary.name: vocabulary})


def build_embed(context: EntryContext, model: Model) -> ModelPlan:
    """The patched image embedding in NVIDIA's image conventions: one FORMAT_NCHW pixels input, one FP32 output."""
    embedding = next(spec for spec in context.outputs if spec.name == EMBEDDING_OUTPUT)
    steps = [Step(context.name("pixels"), {PIXELS_INPUT: PIXELS_INPUT}, {embedding.name: embedding.name})]
    tensors = Tensors(image=context.pixels, outputs=[embedding], image_format=IMAGE_FORMAT)
    config = ensemble_config(model.name, tensors, steps, context.options.batching.max_batch_size, context.common())
    return context.plan(model, config)


def classify_config(name: str, instances: int, parameters: dict[str, Any]) -> mc.ModelConfig:
    """The open-vocabulary model: no batching across requests (each brings its own label set)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    config.version_policy.latest.num_versions = 1
    config.input.add(name=IMAGE_BYTES, data_type=mc.TYPE_STRING, dims=[-1, 1])
    config.input.add(name=LABELS, data_type=mc.TYPE_STRING, dims=[-1])
    config.input.add(name=TEMPLATE_INPUT, data_type=mc.TYPE_STRING, dims=[-1], optional=True)
    config.output.add(name=SCORES, data_type=mc.TYPE_FP32, dims=[-1, -1])
    config.output.add(name="probabilities", data_type=mc.TYPE_FP32, dims=[-1, -1])
    config.output.add(name="classification", data_type=mc.TYPE_STRING, dims=[-1, -1])
    for key, value in parameters.items():
        config.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)
    return config


def build_classify(context: EntryContext, model: Model) -> ModelPlan:
    """Images and a label set in, a score per label out; heads from the text model, cached."""
    text = _text(context)
    limits = context.options.open_vocab
    parameters = {**context.common(), "preprocess": context.preprocess, "limits": context.options.limits,
                  "logit_scale": repr(text.models["patched"].logit_scale), "text_model": context.name("text"),
                  "text_batch": str(context.options.batching.max_batch_size),
                  "max_images": str(context.options.batching.max_batch_size),
                  "max_labels": str(limits["max_labels"]), "max_templates": str(limits["max_templates"]),
                  "max_prompts": str(limits["max_prompts"]),
                  "label_cache": str(limits["label_cache"]), "templates": to_json(text.templates), **_threads(context)}
    instances = limits["classify_instances"] or context.options.batching.instances
    config = classify_config(model.name, instances, parameters)
    return context.plan(model, config, {"model.onnx": context.files["patched"],
                                        **python_model("openvocab_model.py", imaging=True),
                                        OPENVOCAB_FILE: _source(label_sets)})
