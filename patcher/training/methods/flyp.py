"""`flyp`: fine-tune like you pretrain (Goyal et al., CVPR 2023): both towers, CLIP's contrastive loss.

Each training image is paired with a caption, one of its task's templates filled with its class name,
and image and text towers are trained with open_clip's ClipLoss. The reference code uses the identity as
the contrastive target, so two images of the same class in a batch (and their identical or paraphrased
captions) are pushed apart as negatives. `LabelAwareClipLoss` makes every same-class pair a positive: the
target of each row is spread evenly over the items of its class. Heads are rebuilt from the text tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.base import distributed
from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.models.state import State, text_state, visual_state
from patcher.training.config import TrainConfig
from patcher.training.losses import MAX_LOGIT_SCALE
from patcher.training.methods.base import Method, MethodSetup, Stage
from patcher.training.sampling import SEED_STRIDE, WHOLE, Micro, TaskMixture, caption_templates

open_clip = import_open_clip()


def same_class_targets(classes: torch.Tensor) -> torch.Tensor:
    """[N, N] target distribution: row i uniform over the items whose class equals item i's."""
    same = (classes[:, None] == classes[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


class LabelAwareClipLoss(open_clip.ClipLoss):
    """open_clip's ClipLoss with soft targets over same-class pairs; identical to it when all classes differ."""

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        classes: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric cross-entropy of image-to-text and text-to-image logits against same-class targets."""
        if self.world_size > 1:
            raise PatcherError("the label-aware FLYP loss gathers no labels across processes: train on one process")
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        targets = same_class_targets(classes.to(logits_per_image.device))
        return (F.cross_entropy(logits_per_image.float(), targets)
                + F.cross_entropy(logits_per_text.float(), targets.T)) / 2


def gather_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order; gradients flow back to each rank's own rows.

    Every rank then computes the loss of the whole batch; the gather's backward sums the ranks' gradients
    and DistributedDataParallel averages them, which is the one-process gradient.
    """
    if distributed.world_size() == 1:
        return rows
    import torch.distributed.nn.functional as collective

    if not rows.is_floating_point():  # labels: no gradient to carry
        parts = [torch.empty_like(rows) for _ in range(distributed.world_size())]
        torch.distributed.all_gather(parts, rows.contiguous())
        return torch.cat(parts)
    return torch.cat(collective.all_gather(rows.contiguous()))


@dataclass
class ContrastiveParams:
    """FLYP's loss variant."""

    same_class_positives: bool = True  # False: the reference code's identity target (same-class pairs negatives)


class ContrastiveFineTune(Method, name="flyp", trains=("visual", "text"), params=ContrastiveParams,
                          summary="both towers trained with CLIP's contrastive loss on class-name captions; "
                                  "heads rebuilt from text",
                          reference="Goyal et al., Finetune like you pretrain: improved finetuning of zero-shot "
                                    "vision models, CVPR 2023"):
    """Image and text towers (and the temperature) trained contrastively on class-name captions."""

    def __init__(self, setup: MethodSetup, params: ContrastiveParams) -> None:
        super().__init__(setup, params)
        self.model = setup.loaded.model.to(self.device)
        self.mixture = TaskMixture(setup.train_splits, setup.train_config.batch_size, setup.train_config.seed)
        uneven = [task for task, share in self.mixture.shares.items() if share % distributed.world_size()]
        if uneven:
            raise PatcherError(f"flyp gathers equal parts of each batch over {distributed.world_size()} processes: "
                               f"the batch share of {uneven[0]} ({self.mixture.shares[uneven[0]]}) does not divide; "
                               "choose a --batch-size that does")
        self.loss_fn = LabelAwareClipLoss()
        self.same_class_positives = params.same_class_positives if params is not None else True
        tokenizer = setup.loaded.tokenizer
        self.tokens = {  # [classes, templates, context] per patch task
            name: torch.stack([tokenizer([template.format(c) for template in setup.tasks[name].templates])
                               for c in setup.tasks[name].classnames])
            for name in setup.train_splits
        }
        self.cached: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # features of a step's micro-batches
        names = sorted({c for name in setup.train_splits for c in setup.tasks[name].classnames})
        self.class_ids = {  # a class is its name: two tasks' "7" caption the same concept
            name: torch.tensor([names.index(c) for c in setup.tasks[name].classnames]) for name in setup.train_splits
        }

    @classmethod
    def default_config(cls) -> TrainConfig:
        """FLYP's recipe (AdamW, lr 1e-5, wd 0.1, 500 warmup steps, cosine; their ImageNet run) on PAINT's steps."""
        return TrainConfig(lr=1e-5, weight_decay=0.1, warmup_steps=500)

    def captions(self, step: int, micro: Micro = WHOLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, caption tokens, class ids) of this rank's part of the batch at `step` (its micro-batch `micro`).

        Each caption's template is drawn for the whole step's batch and this rank takes its positions,
        so the captions do not depend on the number of processes or micro-batches.
        """
        batch = self.mixture.batch(step)
        texts, classes = [], []
        for number, (task, where) in enumerate(batch.slices.items()):
            labels = batch.labels[where]
            drawn = caption_templates(self.tokens[task].shape[1], self.mixture.shares[task],
                                      self.setup.train_config.seed, step, SEED_STRIDE * number)
            template = drawn[self.mixture.sampler(task).positions]
            texts.append(self.tokens[task][labels, template])
            classes.append(self.class_ids[task][labels])
        rows = batch.rows(micro)
        return batch.micro(micro).inputs(self.device), torch.cat(texts)[rows], torch.cat(classes)[rows]

    def features(self, step: int, micro: Micro = WHOLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, class ids) of a micro-batch, every rank's rows gathered."""
        images, texts, classes = self.captions(step, micro)
        return (gather_with_grad(self.model.encode_image(images, normalize=True)),
                gather_with_grad(self.model.encode_text(texts.to(self.device), normalize=True)),
                gather_with_grad(classes.to(self.device)))

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor, classes: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
        """The label-aware (or, without same-class positives, CLIP's) contrastive loss of the features given."""
        if not self.same_class_positives:
            classes = torch.arange(len(classes))  # every item its own class: open_clip's ClipLoss target
        return self.loss_fn(image_features, text_features, scale, classes)

    def step_loss(self, step: int, micro: Micro = WHOLE) -> torch.Tensor:
        """The label-aware contrastive loss of the whole batch at `step` (features gathered over ranks).

        With micro-batches it is done as open_clip_train does: the first pass caches every micro-batch's
        features without gradients, then each pass recomputes its own with gradients and scores them among the
        cached others, so the passes' gradients add up to the whole batch's. The temperature is trained in the
        last pass alone (each pass sees the same loss), and each pass reports 1/count of the loss.
        """
        scale = self.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        if micro.count == 1:
            return self.loss(*self.features(step), scale)
        if micro.index == 0:
            with torch.no_grad():
                self.cached = [self.features(step, Micro(index, micro.count)) for index in range(micro.count)]
        live = self.features(step, micro)
        parts = [live if index == micro.index else cached for index, cached in enumerate(self.cached)]
        image_features, text_features, classes = (torch.cat([part[column] for part in parts]) for column in range(3))
        loss = self.loss(image_features, text_features, classes, scale if micro.last else scale.detach())
        if micro.last:
            self.cached = []
        return loss - (1 - 1 / micro.count) * loss.detach()

    def stages(self) -> list[Stage]:
        """One stage: the whole CLIP model."""
        return [Stage("flyp", self.model, list(self.model.parameters()), self.step_loss, self.setup.train_config)]

    def close(self) -> None:
        """Stop the data loaders."""
        self.mixture.close()

    def state(self) -> State:
        """Both towers: `visual.*` and `text.*`."""
        return {**visual_state(self.model), **text_state(self.model)}
