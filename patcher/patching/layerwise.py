"""Layer-wise merging coefficients, learnt as AdaMerging does (Yang et al., ICLR 2024).

theta = theta_0 + sum over tasks t of lambda[t, block(key)] * tau_t[key], one coefficient per task and block of the
image encoder (a transformer block, or a top-level module such as conv1 or ln_post). AdaMerging learns lambda by
minimising the entropy of each merged task's predictions on unlabelled images (its test images; here the held-out
split's pixels: the labels are never read); the labelled variant minimises cross-entropy on the held-out labels.
Keys outside the image encoder (probed heads, a text tower) keep the initial coefficient.

Memory stays at a few models whatever the number of runs: the gradient of the loss with respect to lambda[t, b] is
the dot product of the gradient with respect to the merged weights and tau_t over block b, so each step streams
every run's task vector one tensor at a time (`TaskVectors`) instead of holding N of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patcher.base.progress import make_progress
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.state import VISUAL_PREFIX, State, part
from patcher.patching.session import Session
from patcher.patching.sources import TaskVectors

BATCH = 16  # images per task per step


def block_of(key: str) -> str:
    """The block a key belongs to: `visual.transformer.resblocks.3` for its tensors, else its module."""
    parts = key.split(".")
    if "resblocks" in parts:
        return ".".join(parts[: parts.index("resblocks") + 2])
    return ".".join(parts[:2]) if len(parts) > 2 else key


@dataclass
class LearntCoefficients:
    """lambda per block and task, and the loss at each step."""

    blocks: list[str]
    values: list[list[float]]  # [task][block]
    losses: list[float]

    def as_record(self, tasks: list[str]) -> dict[str, dict[str, float]]:
        """{task: {block: coefficient}} rounded for the manifest."""
        return {task: {block: round(value, 6) for block, value in zip(self.blocks, row, strict=True)}
                for task, row in zip(tasks, self.values, strict=True)}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (fusion_bench adamerging/entropy_loss.py's form)."""
    probs = torch.softmax(logits, dim=-1)
    return -(probs * torch.log(probs + 1e-8)).sum(-1).mean()


def _images(session: Session, task: str, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    store = session.splits.val[task]
    indices = np.sort(rng.choice(len(store), size=min(BATCH, len(store)), replace=False))
    pixels = torch.from_numpy(store.read(indices)).to(session.device)
    return session.splits.normalize(pixels), indices


def _merged(vectors: TaskVectors, keys: list[str], groups: dict[str, int], coefficients: torch.Tensor) -> State:
    """The merged tensors of `keys` at these coefficients, as leaves that collect a gradient."""
    merged = {}
    for key in keys:
        value = vectors.base[key].detach().float().clone()
        for run in range(vectors.count):
            value += float(coefficients[run, groups[key]]) * vectors.vector(run, key)
        merged[key] = value.requires_grad_(True)
    return merged


def _coefficient_gradient(vectors: TaskVectors, merged: State, groups: dict[str, int], shape: tuple) -> torch.Tensor:
    gradient = torch.zeros(shape)
    for key, value in merged.items():
        if value.grad is not None:
            for run in range(vectors.count):
                gradient[run, groups[key]] += float((value.grad.cpu() * vectors.vector(run, key)).sum())
    return gradient


def _loss(session: Session, classifier: MultiHeadClassifier, tasks: list[str], loss: str,
          rng: np.random.Generator) -> torch.Tensor:
    total = torch.zeros((), device=session.device)
    for task in tasks:
        images, indices = _images(session, task, rng)
        logits = classifier(images, task=task)[task]
        if loss == "entropy":
            total = total + entropy(logits)
        else:
            labels = torch.from_numpy(session.splits.val[task].labels[indices]).long().to(session.device)
            total = total + F.cross_entropy(logits, labels)
    return total / len(tasks)


def learn(session: Session, vectors: TaskVectors, tasks: list[str], loss: str, params: Mapping[str, float],
          seed: int) -> LearntCoefficients:
    """lambda[task, block] minimising `loss` ("entropy": unlabelled, or "cross-entropy") over the tasks' held-out
    images, Adam from `init`, `steps` steps of BATCH images per task."""
    keys = [key for key in vectors.keys if key.startswith(VISUAL_PREFIX)]
    blocks = list(dict.fromkeys(block_of(key) for key in keys))
    groups = {key: blocks.index(block_of(key)) for key in keys}
    coefficients = torch.full((vectors.count, len(blocks)), float(params["init"]), requires_grad=True)
    optimiser = torch.optim.Adam([coefficients], lr=float(params["lr"]))
    rng = np.random.default_rng(seed)
    heads = session.resolver.heads(vectors.base)
    losses = []
    with make_progress() as progress:
        bar = progress.add_task(f"learning layer-wise coefficients ({loss})", total=int(params["steps"]), status="")
        for _ in range(int(params["steps"])):
            merged = _merged(vectors, keys, groups, coefficients.detach())
            encoder = {key: value.to(session.device) for key, value in part(VISUAL_PREFIX, merged).items()}
            classifier = MultiHeadClassifier(session.loaded.model.visual, {t: heads[t] for t in tasks}, encoder)
            classifier.to(session.device).eval()
            value = _loss(session, classifier, tasks, loss, rng)
            value.backward()
            optimiser.zero_grad()
            coefficients.grad = _coefficient_gradient(vectors, merged, groups, tuple(coefficients.shape))
            optimiser.step()
            losses.append(float(value.detach()))
            progress.update(bar, advance=1, status=f"loss {losses[-1]:.4f}")
    return LearntCoefficients(blocks, coefficients.detach().tolist(), losses)


def layerwise_delta(vectors: TaskVectors, learnt: LearntCoefficients, init: float) -> dict[str, torch.Tensor]:
    """sum over runs of lambda[run, block(key)] * tau_run[key] (keys outside the encoder at `init`)."""
    index = {block: number for number, block in enumerate(learnt.blocks)}
    delta = {}
    for key in vectors.keys:
        block = index.get(block_of(key)) if key.startswith(VISUAL_PREFIX) else None
        total = torch.zeros_like(vectors.base[key], dtype=torch.float32)
        for run in range(vectors.count):
            weight = init if block is None else learnt.values[run][block]
            total += weight * vectors.vector(run, key)
        delta[key] = total
    return delta
