"""The torch module that becomes the ONNX graph: an image encoder with every task's head baked in."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from patcher.base.errors import PatcherError
from patcher.export.contract import EMBEDDING_OUTPUT, logits_output
from patcher.models import build_from_config
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.state import head_scale, split_classifier_state


class ExportGraph(nn.Module):
    """A MultiHeadClassifier whose forward returns a tuple in a fixed order: (embedding, logits of each task)."""

    def __init__(self, classifier: MultiHeadClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    @property
    def tasks(self) -> list[str]:
        """Tasks in output order."""
        return list(self.classifier.task_names)

    @property
    def output_names(self) -> list[str]:
        """Graph output names: `embedding`, then `logits_<task>` per task."""
        return [EMBEDDING_OUTPUT, *(logits_output(task) for task in self.tasks)]

    def output_widths(self) -> dict[str, int]:
        """The non-batch dimension of each output: D for the embedding, the class count for each task."""
        heads = [self.classifier.head(task) for task in self.tasks]
        widths = [heads[0].shape[0], *(head.shape[1] for head in heads)]
        return dict(zip(self.output_names, (int(width) for width in widths), strict=True))

    def logit_scales(self) -> dict[str, float]:
        """Each task's logit scale: the mean norm of its head's class columns (cosine similarity x scale = logit)."""
        return {task: head_scale(self.classifier.head(task)) for task in self.tasks}

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(L2-normalised embedding [N, D], logits [N, C] of each task), one encoder pass for all heads."""
        embedding = self.classifier.embed(image)
        return (embedding, *(embedding @ self.classifier.head(task) for task in self.tasks))


def load_graph(config: Mapping[str, Any], weights: Path, tasks: list[str]) -> ExportGraph:
    """Build the encoder from `open_clip_config.json` content and load a `models/*.safetensors` with these heads."""
    encoder_state, heads = split_classifier_state(load_file(str(weights)))
    missing = [task for task in tasks if task not in heads]
    if missing:
        raise PatcherError(f"{weights} has no head for {', '.join(missing)}: rebuild the run")
    encoder = build_from_config(json.loads(json.dumps(config))).visual
    try:
        encoder.load_state_dict(encoder_state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise PatcherError(f"{weights} does not fit open_clip_config.json ({first}): rebuild the run") from error
    classifier = MultiHeadClassifier(encoder, {task: heads[task] for task in tasks})
    return ExportGraph(classifier).eval()


@torch.no_grad()
def reference_outputs(graph: ExportGraph, images: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """PyTorch's outputs for every image, in the graph's output order: the numbers ONNX must reproduce."""
    chunks = [graph(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]
