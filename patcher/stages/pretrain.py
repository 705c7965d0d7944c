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
from patcher.benchmark.machine import machine_info
from patcher.data.evaluation import Scorer, predict
from patcher.data.image_store import StoreItems, build_store
from patcher.data.prepared_splits import TrainSplit
from patcher.data.tasks import Task, get_task
from patcher.data.tasks.rendered.canvas import RecolouredView
from patcher.data.tasks.suites import suite_tasks
from patcher.data.transforms import Normalize
from patcher.models import load_clip
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.clip_loader import CONFIG_FILENAME, LoadedModel
from patcher.models.heads import build_head
from patcher.models.reference import TOKEN_TABLE, round_to_stored, token_table, write_shipped
from patcher.models.reference import WEIGHTS_FILE as SHIPPED_WEIGHTS
from patcher.models.state import state_dict_digest
from patcher.runs.layout import CHECKPOINTS, TRAIN_LOG
from patcher.training.config import TrainConfig
from patcher.training.loop import Tracking, checkpoint_step, pick_device, train
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
    recolour: float = 0.0  # share of images drawn in two random colours (RecolouredView)

# The reference model's pretraining data: each suite task's class names, shown in a clean domain.
REFERENCE_SOURCES = (
    Source("fashion-mnist", "train", None, 1.0, recolour=0.3),
    Source("printed-digits", "train", None, 1.0, recolour=0.5),
    Source("printed-letters", "train", None, 1.5, recolour=0.5),
    Source("filled-shapes", "train", None, 1.0, recolour=0.5),
    Source("textures", "train", None, 1.0, recolour=0.5),
    Source("dice", "train", None, 0.8, recolour=0.5),
)


@dataclass
class PretrainOptions:
    """What `patcher pretrain` takes; the defaults are the offline reference model."""

    sources: list[Source] = field(default_factory=lambda: list(REFERENCE_SOURCES))
    model: str = "patcher-base"
    image_size: int | None = None
    objective: str = "classes"  # or "instances": CLIP's loss, one positive caption per image
    freeze_token_embedding: bool = True  # the text tower sees a few dozen words; their table is most of the weights
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1500, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=50, checkpoint_every=250
        )
    )
    evaluate: tuple[str, ...] | None = None  # zero-shot table besides the sources (default: the suite, or digits)
    device: str = "auto"
    data_dir: Path | None = None
    download: bool = False
    out: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.evaluate is None:  # the reference model's record shows the suite; a small variant's, digits
            self.evaluate = suite_tasks("mini-8") if tuple(self.sources) == REFERENCE_SOURCES else ("digits",)
        if self.objective not in OBJECTIVES:
            raise PatcherError(f"unknown pretraining objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the weights."""
        data = asdict(self)
        for key in ("device", "data_dir", "download", "out", "resume", "evaluate"):
            data.pop(key)
        for key in ("checkpoint_every", "log_every"):
            data["train"].pop(key)
        return json.loads(json.dumps(data, default=str))


    def command(self) -> str:
        """The `patcher pretrain` command line that gives these options' weights."""
        defaults, given = PretrainOptions(), self.fingerprint()
        words = ["patcher pretrain"]
        if given["model"] != defaults.model:
            words.append(f"--model {given['model']}")
        if given["objective"] != defaults.objective:
            words.append(f"--objective {given['objective']}")
        for key in ("steps", "batch_size", "lr", "warmup_steps", "seed"):
            if given["train"][key] != getattr(defaults.train, key):
                words.append(f"--{key.replace('_', '-')} {given['train'][key]}")
        if given["sources"] != defaults.fingerprint()["sources"]:
            words.append("(sources: " + ", ".join(f"{s['task']}/{s['split']}" for s in given["sources"]) + ")")
        return " ".join(words)


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
    if source.recolour > 0:
        dataset = RecolouredView(dataset, source.recolour, seed=options.train.seed)
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


def _fresh_model(options: PretrainOptions, device: str) -> LoadedModel:
    """The architecture at its seeded initialisation, the token table regenerated from its seed and frozen."""
    torch.manual_seed(options.train.seed)
    loaded = load_clip(options.model, None, options.image_size, device=device)
    if options.freeze_token_embedding:  # frozen, so regenerated from its seed instead of stored
        table = loaded.model.token_embedding.weight
        with torch.no_grad():
            table.copy_(token_table(table.shape[0], table.shape[1], options.train.seed).to(table.device))
        table.requires_grad_(False)
    return loaded


def _train_on(model: torch.nn.Module, sources: list[_CaptionedData], options: PretrainOptions, staging: Path,
              device: str) -> tuple[list[int], float]:
    """Train on the sources' mixture, checkpoints and train.log in `staging`: (images per batch of each source,
    seconds spent)."""
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
        tracking = Tracking(checkpoint_dir=checkpoint_dir, log=lambda entry: append_json_line(log_path, entry),
                            description=f"pretraining {options.model}")
        train(model, model.parameters(), step_loss, options.train, device, tracking)
    finally:
        mixture.close()
    return per_batch, time.perf_counter() - tick


def _pretrain_into(options: PretrainOptions, output: Staging, device: str, started: float) -> Path:
    loaded = _fresh_model(options, device)
    model = loaded.model
    sources = [_captioned(get_task(s.task), s, loaded, options) for s in options.sources]
    staging = output.open()  # after the data is found
    per_batch, train_seconds = _train_on(model, sources, options, staging, device)
    names = [f"{s.task}/{s.split}" for s in options.sources]

    model.eval().cpu()
    if options.freeze_token_embedding:
        round_to_stored(model)  # what is evaluated and recorded is what the shipped file holds
        write_shipped(model, staging)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / WEIGHTS_FILENAME), metadata={"format": "pt"})
    (staging / CONFIG_FILENAME).write_text(json.dumps(loaded.open_clip_config(), indent=2) + "\n")
    evaluated = tuple(dict.fromkeys([*(source.task for source in options.sources), *(options.evaluate or ())]))
    evaluation = zero_shot_report(f"local-dir:{staging}", options.data_dir, device, evaluated)
    shipped = [name for name in (SHIPPED_WEIGHTS,) if (staging / name).is_file()]
    record = {
        "format": "patcher-pretrain/2",
        "created": now_iso(),
        "command": options.command(),
        "commit": source_commit(),
        "architecture": options.model,
        "options": options.fingerprint(),
        "device": device,
        "machine": machine_info(),
        "per_batch": dict(zip([f"{s.task}/{s.split}" for s in options.sources], per_batch, strict=True)),
        "images": {name: len(data.split) for name, data in zip(names, sources, strict=True)},
        "token_table": _token_table_record(model, options),
        "state_sha256": state_dict_digest(state),
        "zero_shot": evaluation,
        "files": {name: to_json(FileRecord.of(staging / name))
                  for name in (WEIGHTS_FILENAME, CONFIG_FILENAME, *shipped)},
        "versions": versions(),
        "timings_s": {"train": round(train_seconds, 2), "total": round(time.perf_counter() - started, 2)},
    }
    write_json(staging / RECORD_FILENAME, record)
    return output.final


def _token_table_record(model: Any, options: PretrainOptions) -> dict[str, Any] | None:
    if not options.freeze_token_embedding:
        return None
    vocab_size, width = model.state_dict()[TOKEN_TABLE].shape
    return {"vocab_size": int(vocab_size), "width": int(width), "seed": options.train.seed,
            "rule": "patcher.models.reference.token_table"}


def source_commit() -> str | None:
    """The git commit of the code that ran, with "+dirty" when the tree had changes; None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


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
        correct = predict(Scorer(classifier=classifier, normalize=normalize, device=device), store, name) == labels
        per_class = {
            task.classnames[c]: round(100.0 * correct[labels == c].float().mean().item(), 2)
            for c in range(len(task.classnames))
            if (labels == c).any()
        }
        report[name] = {"accuracy": round(100.0 * correct.float().mean().item(), 2), "per_class": per_class,
                        "chance": round(100.0 / len(task.classnames), 2)}
    return report
