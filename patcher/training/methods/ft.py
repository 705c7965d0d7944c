"""`ft`: the image encoder trained with cross-entropy through the frozen zero-shot heads (PAINT)."""

from __future__ import annotations

import torch

from patcher.models.classifier import MultiHeadClassifier
from patcher.models.state import VISUAL_PREFIX, State, prefixed
from patcher.training.losses import classification_loss
from patcher.training.methods.base import Method, MethodSetup, Stage
from patcher.training.sampling import WHOLE, Micro, TaskMixture


class FineTune(Method, name="ft", trains=("visual",),
               summary="image encoder trained through the frozen zero-shot heads",
               reference="Ilharco et al., Patching open-vocabulary models by interpolating weights (PAINT), "
                         "NeurIPS 2022"):
    """Full fine-tuning of the image encoder; heads stay the zero-shot ones (Ilharco et al., 2022)."""

    def __init__(self, setup: MethodSetup, params: object) -> None:
        super().__init__(setup, params)
        self.encoder = setup.loaded.model.visual
        heads = {task: setup.heads[task] for task in setup.train_splits}
        self.classifier = MultiHeadClassifier(self.encoder, heads).to(self.device)
        self.mixture = TaskMixture(setup.train_splits, setup.train_config.batch_size, setup.train_config.seed)
        self.cross_entropy = classification_loss(self.classifier, self.mixture, self.device)

    def step_loss(self, step: int, micro: Micro = WHOLE) -> torch.Tensor:
        """Cross-entropy of the balanced batch at `step` (of its micro-batch `micro`)."""
        return self.cross_entropy(step, micro)

    def stages(self) -> list[Stage]:
        """One stage: the encoder."""
        return [Stage("ft", self.encoder, list(self.encoder.parameters()), self.step_loss, self.setup.train_config)]

    def close(self) -> None:
        """Stop the data loaders."""
        self.mixture.close()

    def state(self) -> State:
        """The encoder's weights as `visual.*`."""
        return prefixed(VISUAL_PREFIX, self.encoder.state_dict())
