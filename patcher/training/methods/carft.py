"""`carft`: cross-entropy plus lambda * KL between the starting and the current model's context distribution.

Context-Aware Robust Fine-Tuning (Mao et al., 2022, arXiv:2211.16175). The "context head" has one column
per prompt template, the template's text embedding averaged over the task's class names: it scores which
context ("a sketch of", "a blurry photo of", ...) an image shows, not which class. The starting model's
context distribution comes from a frozen copy of the starting encoder on the same (augmented) images, so
the KL term is the paper's and is zero at step 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.data.tasks import Task
from patcher.data.tasks.templates import imagenet as imagenet_templates
from patcher.models import LoadedModel
from patcher.training.losses import mixture_cross_entropy
from patcher.training.methods.base import MethodSetup
from patcher.training.methods.ft import FineTune
from patcher.training.sampling import WHOLE, Micro, MixedBatch

open_clip = import_open_clip()


CONTEXTS = ("task", "imagenet")


@dataclass
class ContextParams:
    """CAR-FT's weight on the context KL term and where its context prompts come from."""

    kl_weight: float = 1.0  # lambda = 1, the weight Mao et al. (2022) use for the context KL with CLIP ViT-B/16
    contexts: str = "task"  # the task's own templates, or "imagenet": CLIP's 80 ImageNet templates (the paper's)


def context_templates(task: Task, contexts: str) -> list[str]:
    """The prompt templates whose contexts the KL keeps: the task's, or CLIP's 80 ImageNet ones."""
    if contexts not in CONTEXTS:
        raise PatcherError(f"--param contexts={contexts!r}: use one of {', '.join(CONTEXTS)}")
    return list(task.templates) if contexts == "task" else list(imagenet_templates())


def _fill(template: str, name: str) -> str:
    return template.format(name)


@torch.no_grad()
def context_head(loaded: LoadedModel, classnames: list[str], templates: list[str], device: str = "cpu") -> torch.Tensor:
    """[D, M]: per template, the normalised mean over class names of normalised text embeddings, times the scale."""
    model = loaded.model.to(device).eval()
    # open_clip's zero-shot builder averages over its `templates` argument per "class": pass the templates as
    # the classes and one filler per class name as the templates, and it averages over class names instead.
    fillers = [partial(_fill, name=name) for name in classnames]
    weights = open_clip.build_zero_shot_classifier(
        model, loaded.tokenizer, list(templates), fillers, num_classes_per_batch=32, device=device
    )
    return (weights * model.logit_scale.exp()).float()


def context_kl(reference_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over items of KL(reference || softmax(logits)) over contexts (0 for no items)."""
    if len(logits) == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), reference_log_probs, log_target=True, reduction="batchmean")


class ContextAwareFineTune(FineTune, name="carft", trains=("visual",), params=ContextParams,
                           summary="ft + KL to the starting model's distribution over context prompts",
                           reference="Mao et al., Context-Aware Robust Fine-Tuning, 2022 (arXiv:2211.16175)"):
    """ft's cross-entropy plus kl_weight * KL(p_start(context | x) || p_current(context | x))."""

    def __init__(self, setup: MethodSetup, params: ContextParams) -> None:
        super().__init__(setup, params)
        self.context_heads = {
            name: context_head(setup.loaded, list(setup.tasks[name].classnames),
                               context_templates(setup.tasks[name], params.contexts), self.device)
            for name in setup.train_splits
        }
        # p_start(context | x) comes from a frozen copy of the starting encoder, on the same (augmented) images
        self.reference_encoder = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        self.last_terms: dict[str, float] = {}

    def step_terms(self) -> dict[str, float]:
        """The last step's cross-entropy and KL terms."""
        return dict(self.last_terms)

    def step_loss(self, step: int, micro: Micro = WHOLE) -> torch.Tensor:
        """Cross-entropy + kl_weight * context KL on the batch at `step` (of its micro-batch `micro`).

        Both terms are sums over items of the global batch mean (the KL is each image's own, against the
        starting encoder on that image), so micro-batches' losses, and their logged terms, add up to the batch's.
        """
        batch = self.mixture.batch(step).micro(micro)
        images = batch.inputs(self.device)
        features = self.classifier.embed(images)
        cross_entropy = mixture_cross_entropy(features, batch, self.classifier.head)
        kl = self.kl(images, features, batch)
        terms = {"cross_entropy": cross_entropy.detach().item(), "kl": kl.detach().item()}
        if micro.index > 0:
            terms = {name: value + self.last_terms[name] for name, value in terms.items()}
        self.last_terms = terms
        return cross_entropy + self.params.kl_weight * kl

    def kl(self, images: torch.Tensor, features: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        """The context KL of a batch's features against the starting encoder's, the global mean over items."""
        with torch.no_grad():
            reference = F.normalize(self.reference_encoder(images), dim=-1)
        total = features.new_zeros((), dtype=torch.float32)
        for task, where in batch.slices.items():
            head = self.context_heads[task]
            reference_log_probs = F.log_softmax(reference[where].float() @ head.float(), dim=-1)
            logits = features[where] @ head.to(features.dtype)
            total = total + context_kl(reference_log_probs, logits) * (where.stop - where.start)
        return total * batch.loss_scale
