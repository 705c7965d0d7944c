"""`lp` (linear probe on the frozen encoder) and `lpft` (linear probe, then full fine-tuning from it).

Kumar et al., Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution (ICLR 2022).
Heads are initialised from the zero-shot head and kept in the stored form, scale * normalize(W) per class
(a cosine classifier at the zero-shot logit scale), so every head a run writes keeps the contract's form.
The encoder is frozen while probing, so the probe trains on embeddings computed once (un-augmented).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from patcher.data.items import TensorItems
from patcher.data.prepared_splits import TrainSplit
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.state import HEAD_PREFIX, VISUAL_PREFIX, State, head_scale, prefixed
from patcher.training.config import TrainConfig
from patcher.training.losses import mixture_cross_entropy
from patcher.training.methods.base import Method, MethodSetup, NoParams, Stage
from patcher.training.methods.features import embed_split
from patcher.training.sampling import WHOLE, Micro, TaskMixture

# Kumar et al. fit the probe to convergence (L-BFGS logistic regression on frozen features). On cached
# embeddings the same is cheap with the shared loop: AdamW at lr 1e-3 without weight decay or warmup,
# 2,000 steps of batch 128 (many epochs of the tasks here), a setting that converges on normalised features.
PROBE_LR = 1e-3
PROBE_WEIGHT_DECAY = 0.0
PROBE_STEPS = 2000


class CosineHeads(nn.Module):
    """One trainable head per task, used as scale * normalize(W) per class column; W starts at the given head."""

    def __init__(self, heads: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.task_names = list(heads)
        self.weights = nn.ParameterList([nn.Parameter(h.detach().clone().float()) for h in heads.values()])
        self.register_buffer("scales", torch.tensor([head_scale(h) for h in heads.values()]))

    def head(self, task: str) -> torch.Tensor:
        """The [D, C] head of `task` in stored form."""
        index = self.task_names.index(task)
        return F.normalize(self.weights[index], dim=0) * self.scales[index]


class LinearProbe(Method, name="lp", trains=("heads",), params=NoParams,
                  summary="linear probe: patch-task heads trained (from the zero-shot head), encoder frozen",
                  reference="Kumar et al., Fine-Tuning can Distort Pretrained Features and Underperform OOD, "
                            "ICLR 2022"):
    """Heads of the patch tasks trained on frozen embeddings; the encoder is left exactly as it was."""

    def __init__(self, setup: MethodSetup, params: object) -> None:
        super().__init__(setup, params)
        self.encoder = setup.loaded.model.visual
        self.probe = CosineHeads({task: setup.heads[task] for task in setup.train_splits}).to(self.device)
        frozen = MultiHeadClassifier(self.encoder, {}).to(self.device)
        self.features = {
            task: TrainSplit(TensorItems(*embed_split(frozen, split, self.device, what=f"{task}/train")))
            for task, split in setup.train_splits.items()
        }
        self.mixtures: list[TaskMixture] = []

    @classmethod
    def default_config(cls) -> TrainConfig:
        """The probe's settings (see PROBE_LR above)."""
        return TrainConfig(steps=PROBE_STEPS, lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY, warmup_steps=0)

    def probe_config(self) -> TrainConfig:
        """The probing stage's hyperparameters."""
        return self.setup.train_config

    def probe_stage(self) -> Stage:
        """Cross-entropy of the probe on cached embeddings, balanced over patch tasks."""
        config = self.probe_config()
        mixture = TaskMixture(self.features, config.batch_size, config.seed)
        self.mixtures.append(mixture)

        def step_loss(step: int, micro: Micro = WHOLE) -> torch.Tensor:
            batch = mixture.batch(step).micro(micro)
            return mixture_cross_entropy(batch.inputs(self.device), batch, self.probe.head)

        return Stage("lp", self.probe, list(self.probe.parameters()), step_loss, config)

    def stages(self) -> list[Stage]:
        """One stage: the probe."""
        return [self.probe_stage()]

    def close(self) -> None:
        """Stop the data loaders."""
        for mixture in self.mixtures:
            mixture.close()

    def state(self) -> State:
        """The trained heads as `heads.<task>`, in stored form."""
        with torch.no_grad():
            return prefixed(HEAD_PREFIX, {task: self.probe.head(task) for task in self.probe.task_names})

    def trained_heads(self) -> list[str]:
        """The patch tasks."""
        return list(self.probe.task_names)


@dataclass
class ProbeThenFineTuneParams:
    """The probing stage of LP-FT; the fine-tuning stage takes the build's --steps/--lr/..."""

    lp_steps: int = PROBE_STEPS
    lp_lr: float = PROBE_LR
    lp_weight_decay: float = PROBE_WEIGHT_DECAY


class LinearProbeThenFineTune(LinearProbe, name="lpft", trains=("visual", "heads"), params=ProbeThenFineTuneParams,
                              summary="linear probe, then full fine-tuning (encoder and probed heads) starting "
                                      "from it"):
    """LP, then every parameter (encoder and the probed heads) fine-tuned from there with cross-entropy."""

    @classmethod
    def default_config(cls) -> TrainConfig:
        """The fine-tuning stage: PAINT's (Kumar et al. fine-tune with the same small learning rate as FT)."""
        return TrainConfig()

    def probe_config(self) -> TrainConfig:
        """The probing stage: lp_* parameters; batch size, seed, clipping, accumulation and logging the build's."""
        base = self.setup.train_config
        return replace(base, steps=self.params.lp_steps, lr=self.params.lp_lr,
                       weight_decay=self.params.lp_weight_decay, warmup_steps=0)

    def stages(self) -> list[Stage]:
        """The probe, then the encoder and the probed heads together."""
        classifier = MultiHeadClassifier(self.encoder, {})
        mixture = TaskMixture(self.setup.train_splits, self.setup.train_config.batch_size, self.setup.train_config.seed)
        self.mixtures.append(mixture)

        def step_loss(step: int, micro: Micro = WHOLE) -> torch.Tensor:
            batch = mixture.batch(step).micro(micro)
            return mixture_cross_entropy(classifier.embed(batch.inputs(self.device)), batch, self.probe.head)

        module = nn.ModuleDict({"encoder": self.encoder, "probe": self.probe})
        finetune = Stage("ft", module, list(module.parameters()), step_loss, self.setup.train_config)
        return [self.probe_stage(), finetune]

    def state(self) -> State:
        """The encoder as `visual.*` and the heads as `heads.<task>`."""
        return {**prefixed(VISUAL_PREFIX, self.encoder.state_dict()), **super().state()}
