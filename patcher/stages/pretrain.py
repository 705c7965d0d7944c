"""`patcher pretrain`: contrastive image-text training of a small open_clip model on captioned images.

Captions are a task's templates filled with its class names, so a model pretrained here knows the
classes it saw by name: the offline stand-in for a pretrained CLIP. The reference scenario mirrors
PAINT's: Fashion-MNIST's train split (its held-out val images excluded) and digits printed in
matplotlib's fonts, so the model knows all ten digit names but has never seen handwriting.

The default objective counts every caption of a class as a positive of each of its images (UniCL,
Yang et al., CVPR 2022): with ten classes per source a batch holds many images per caption, which CLIP's
instance pairs would push apart as negatives. "instances" keeps CLIP's one-positive pairs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import Subset

from patcher.base.cache import cache_dir
from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.base.files import FileRecord, append_json_line, now_iso, trim_json_lines, write_json
from patcher.base.records import to_json
from patcher.base.staging import Resume, Staging, resumable_path, staged_output
from patcher.base.versions import versions
from patcher.data.evaluation import predict
from patcher.data.image_store import StoreItems, build_store
from patcher.data.loading import TrainSplit
from patcher.data.tasks import Task, get_task
from patcher.data.transforms import Normalize
from patcher.models import load_clip
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.heads import build_head
from patcher.models.loading import CONFIG_FILENAME
from patcher.runs.layout import CHECKPOINTS, TRAIN_LOG
from patcher.training.config import TrainConfig
from patcher.training.loop import checkpoint_step, pick_device, train
from patcher.training.losses import MAX_LOGIT_SCALE, class_contrastive_loss
from patcher.training.sampling import MixedBatch, TaskMixture, caption_templates

open_clip = import_open_clip()

WEIGHTS_FILENAME = "open_clip_model.safetensors"
RECORD_FILENAME = "pretrain.json"
OBJECTIVES = ("classes", "instances")


@dataclass
class Source:
    """Images of one task's split, optionally only some classes, captioned with that task's templates."""

    task: str
    split: str
    classes: list[int] | None = None
    weight: float = 1.0


@dataclass
class PretrainOptions:
    """What `patcher pretrain` takes; the defaults are the offline reference model."""

    sources: list[Source] = field(
        default_factory=lambda: [
            Source("fashion-mnist", "train", None, 0.5),
            Source("printed-digits", "train", None, 0.5),
        ]
    )
    model: str = "patcher-mini"
    image_size: int | None = None
    objective: str = "classes"  # or "instances": CLIP's loss, one positive caption per image
    freeze_token_embedding: bool = True  # the text tower sees a few dozen words; their table is most of the weights
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=50, checkpoint_every=100
        )
    )
    device: str = "auto"
    data_dir: Path | None = None
    download: bool = False
    out: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PatcherError(f"unknown pretraining objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the weights."""
        data = asdict(self)
        for key in ("device", "data_dir", "download", "out", "resume"):
            data.pop(key)
        for key in ("checkpoint_every", "log_every"):
            data["train"].pop(key)
        return json.loads(json.dumps(data, default=str))


def reference_dir(options: PretrainOptions) -> Path:
    """The cache folder of the model these options produce, named by their hash."""
    digest = hashlib.sha256(json.dumps(options.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir("models") / f"{options.model}-{digest}"


@dataclass
class _CaptionedData:
    split: TrainSplit  # the source's images, decoded once into a RAM store
    tokens: torch.Tensor  # [classes, templates, context]


def _captioned(task: Task, source: Source, loaded: Any, options: PretrainOptions) -> _CaptionedData:
    dataset = task.dataset(source.split, data_root=options.data_dir, download=options.download)
    if source.classes is not None:
        keep = [i for i in range(len(dataset)) if int(dataset[i][1]) in set(source.classes)]
        dataset = Subset(dataset, keep)
    if len(dataset) == 0:
        raise PatcherError(f"{task.name}/{source.split} has no images of classes {source.classes}")
    store, _ = build_store(dataset, loaded.preprocess_cfg, f"decoding {task.name}/{source.split}", in_memory=True)
    captions = [[template.format(name) for template in task.templates] for name in task.classnames]
    tokens = torch.stack([loaded.tokenizer(per_class) for per_class in captions])
    return _CaptionedData(TrainSplit(StoreItems(store, Normalize(loaded.preprocess_cfg))), tokens=tokens)


def pretrain(options: PretrainOptions) -> Path:
    """Train a small CLIP with the symmetric contrastive loss; write an open_clip `local-dir:` folder."""
    started = time.perf_counter()
    out = Path(options.out) if options.out else reference_dir(options)
    if out.exists():
        raise PatcherError(f"{out} already exists: pass another --out, or use it with --model local-dir:{out}")
    if options.resume and options.out is None and not resumable_path(out).exists():
        raise PatcherError(f"nothing to resume for {out}: run without --resume")
    device = pick_device(options.device)
    resume = Resume(options.fingerprint(), options.resume)
    with staged_output(out, resume=resume) as output:  # locked; renamed into place or removed at the end
        return _pretrain_into(options, output, device, started)


def _pretrain_into(options: PretrainOptions, output: Staging, device: str, started: float) -> Path:
    out = output.final
    torch.manual_seed(options.train.seed)
    loaded = load_clip(options.model, None, options.image_size, device=device)
    model = loaded.model
    if options.freeze_token_embedding:
        model.token_embedding.weight.requires_grad_(False)

    sources = [_captioned(get_task(s.task), s, loaded, options) for s in options.sources]
    staging = output.open()  # after the data is found
    weights = torch.tensor([s.weight for s in options.sources], dtype=torch.float)
    per_batch = _split_batch(options.train.batch_size, weights)
    names = [f"{s.task}/{s.split}" for s in options.sources]
    mixture = TaskMixture({name: data.split for name, data in zip(names, sources, strict=True)},
                          options.train.batch_size, options.train.seed, shares=per_batch)
    step_loss = (_class_step_loss if options.objective == "classes" else _instance_step_loss)(
        model, mixture, sources, options.train.seed, device)

    log_path = staging / TRAIN_LOG
    checkpoint_dir = staging / CHECKPOINTS
    checkpoint_dir.mkdir(exist_ok=True)
    trim_json_lines(log_path, checkpoint_step(checkpoint_dir))
    tick = time.perf_counter()
    try:
        train(model, model.parameters(), step_loss, options.train, device, checkpoint_dir,
              lambda entry: append_json_line(log_path, entry), f"pretraining {options.model}")
    finally:
        mixture.close()
    train_seconds = time.perf_counter() - tick

    model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS_FILENAME), metadata={"format": "pt"})
    (staging / CONFIG_FILENAME).write_text(json.dumps(loaded.open_clip_config(), indent=2) + "\n")
    evaluated = tuple(dict.fromkeys([*(source.task for source in options.sources), "digits"]))
    evaluation = zero_shot_report(f"local-dir:{staging}", options.data_dir, device, evaluated)
    record = {
        "format": "patcher-pretrain/1",
        "created": now_iso(),
        "options": options.fingerprint(),
        "device": device,
        "per_batch": dict(zip([f"{s.task}/{s.split}" for s in options.sources], per_batch, strict=True)),
        "images": {name: len(data.split) for name, data in zip(names, sources, strict=True)},
        "zero_shot": evaluation,
        "files": {name: to_json(FileRecord.of(staging / name)) for name in (WEIGHTS_FILENAME, CONFIG_FILENAME)},
        "versions": versions(),
        "timings_s": {"train": round(train_seconds, 2), "total": round(time.perf_counter() - started, 2)},
    }
    write_json(staging / RECORD_FILENAME, record)
    return out


def _scaled_features(model: Any, batch: MixedBatch, captions: list[torch.Tensor],
                     device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised image and caption features of one step, and CLIP's clamped temperature."""
    images = model.encode_image(batch.inputs(device), normalize=True)
    texts = model.encode_text(torch.cat(captions).to(device), normalize=True)
    return images, texts, model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def _instance_step_loss(model: Any, mixture: TaskMixture, sources: list[_CaptionedData], seed: int,
                        device: str) -> Callable[[int], torch.Tensor]:
    """CLIP's objective: each image against the batch's captions, its own caption the one positive."""
    loss_fn = open_clip.ClipLoss()

    def step_loss(step: int) -> torch.Tensor:
        batch = mixture.batch(step)
        captions = []
        for number, (data, part) in enumerate(zip(sources, batch.parts.values(), strict=True)):
            template = caption_templates(data.tokens.shape[1], len(part.labels), seed, step, number)
            captions.append(data.tokens[part.labels, template])
        return loss_fn(*_scaled_features(model, batch, captions, device))

    return step_loss


def _class_step_loss(model: Any, mixture: TaskMixture, sources: list[_CaptionedData], seed: int,
                     device: str) -> Callable[[int], torch.Tensor]:
    """UniCL's objective: one caption per class in the batch, every image of that class its positive."""

    def step_loss(step: int) -> torch.Tensor:
        batch = mixture.batch(step)
        captions, image_classes, classes_before = [], [], 0
        for number, (data, part) in enumerate(zip(sources, batch.parts.values(), strict=True)):
            present, position = torch.unique(part.labels, return_inverse=True)
            template = caption_templates(data.tokens.shape[1], len(present), seed, step, number)
            captions.append(data.tokens[present, template])
            image_classes.append(position + classes_before)
            classes_before += len(present)
        images, texts, scale = _scaled_features(model, batch, captions, device)
        return class_contrastive_loss(images, texts, torch.cat(image_classes).to(device), scale)

    return step_loss


def _split_batch(batch_size: int, weights: torch.Tensor) -> list[int]:
    counts = (weights / weights.sum() * batch_size).floor().long()
    counts[0] += batch_size - int(counts.sum())
    if (counts <= 0).any():
        raise PatcherError(f"batch size {batch_size} is too small for {len(weights)} data sources")
    return counts.tolist()


@torch.no_grad()
def zero_shot_report(model_name: str, data_dir: Path | None = None, device: str = "cpu",
                     tasks: tuple[str, ...] = ("fashion-mnist", "digits")) -> dict[str, Any]:
    """Zero-shot test accuracy per task and per class, so seen and unseen classes can be told apart."""
    loaded = load_clip(model_name, None, device=device)
    normalize = Normalize(loaded.preprocess_cfg)
    report: dict[str, Any] = {}
    for name in tasks:
        task = get_task(name)
        head = build_head(loaded, list(task.classnames), list(task.templates), device)
        classifier = MultiHeadClassifier(loaded.model.visual, {name: head})
        store, _ = build_store(task.dataset("test", data_root=data_dir), loaded.preprocess_cfg,
                               f"zero-shot {name}", in_memory=True)
        labels = torch.from_numpy(store.labels)
        correct = predict(classifier, store, name, normalize, device=device) == labels
        per_class = {
            task.classnames[c]: round(100.0 * correct[labels == c].float().mean().item(), 2)
            for c in range(len(task.classnames))
            if (labels == c).any()
        }
        report[name] = {"accuracy": round(100.0 * correct.float().mean().item(), 2), "per_class": per_class,
                        "chance": round(100.0 / len(task.classnames), 2)}
    return report
