"""Load CLIP models through open_clip's factory, failing fast and clearly when offline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.models.reference import REFERENCE_NAME, load_reference_weights, provenance
from patcher.models.state import state_dict_digest

open_clip = import_open_clip()

# small offline CLIPs: patcher-tiny (28 px), patcher-tiny-p32 (224 px, patch 32), patcher-mini (28 px), patcher-base
# (28 px, the shipped reference model's architecture)
open_clip.add_model_config(Path(__file__).parent / "configs")

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILENAME = "open_clip_config.json"
HUB_HOST = "huggingface.co"


@dataclass
class LoadedModel:
    """A CLIP model with what later stages need to rebuild and describe it."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str | None
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    weights_sha256: str = field(default="")

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text embedding."""
        return int(self.model_cfg["embed_dim"])

    def open_clip_config(self) -> dict[str, Any]:
        """The `open_clip_config.json` content that `local-dir:` loading reads back."""
        return {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _model_config(name: str, image_size: int | None) -> dict[str, Any]:
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        config_path = folder / CONFIG_FILENAME
        if not config_path.is_file():
            raise PatcherError(f"{config_path} not found: a local-dir: model needs {CONFIG_FILENAME} and weights")
        if not any(folder.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
            raise PatcherError(f"{folder} has no weights file (*.safetensors, *.bin, *.pth): nothing to load")
        cfg = json.loads(config_path.read_text())["model_cfg"]
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise PatcherError(
                f"unknown model {name!r}: use an open_clip name (see `patcher models`), "
                "or local-dir:DIR for a folder with open_clip_config.json"
            )
    cfg = json.loads(json.dumps(cfg))
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def _cached_tag_weights(name: str, tag: str) -> str | None:
    """The weights file of an open_clip tag in the local Hugging Face (or open_clip URL) cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    model_id, filename = os.path.split(cfg.get("hf_hub", ""))
    if model_id:
        for candidate in dict.fromkeys(["open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"]):
            found = try_to_load_from_cache(model_id, candidate)
            if isinstance(found, str):
                return found
    url_copy = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", "") or "none")
    return str(url_copy) if url_copy.is_file() else None


def _pretrained_arguments(name: str, pretrained: str | None) -> dict[str, Any]:
    """What open_clip.create_model needs for these weights; unknown tags refused, uncached ones at once when offline.

    With the hub unreachable, a cached tag is loaded from its file with the settings the tag implies (QuickGELU,
    preprocessing), so open_clip never starts its retry loop against a hub it cannot reach.
    """
    if pretrained is None or name.startswith(LOCAL_DIR_PREFIX) or Path(pretrained).expanduser().is_file():
        return {"pretrained": pretrained}
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = ", ".join(tags) or "none"
        raise PatcherError(f"{pretrained!r} is neither a file nor a pretrained tag of {name} (tags: {known})")
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and _hub_reachable():
        return {"pretrained": pretrained}
    cached = _cached_tag_weights(name, pretrained)
    if cached is None:
        raise PatcherError(f"weights {name}/{pretrained} are not cached and the model hub is unreachable: download "
                           "them on a connected machine and pass --pretrained FILE (or --model local-dir:DIR)")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    preprocess = {key: cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}
    return {"pretrained": cached, "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
            "force_preprocess_cfg": preprocess}


class _SkipRandomInitNotice(logging.Filter):
    """Drops open_clip's notices that a model starts from random weights, where that is what was asked for."""

    NOTICES = ("No pretrained weights loaded", "but no CLIP weights found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self.NOTICES)


@contextlib.contextmanager
def _random_init_expected() -> Iterator[None]:
    """For the duration of one create_model call, leave out open_clip's random-initialisation notices."""
    notices = _SkipRandomInitNotice()
    logging.getLogger().addFilter(notices)  # open_clip logs through the root logger
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notices)


def load_clip(
    name: str,
    pretrained: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load an open_clip model by name and tag, checkpoint file, or `local-dir:DIR`; weights random if none.
    `patcher-reference` is the shipped reference model."""
    if name == REFERENCE_NAME:  # like a local-dir: folder, it carries its own weights: a pretrained tag is ignored
        return _load_reference(image_size, device)
    if name.startswith(LOCAL_DIR_PREFIX):
        pretrained = None  # the folder carries its own weights
    model_cfg = _model_config(name, image_size)
    kwargs: dict[str, Any] = {"device": device, **_pretrained_arguments(name, pretrained)}
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    random_init = pretrained is None and not name.startswith(LOCAL_DIR_PREFIX)
    try:
        with _random_init_expected() if random_init else contextlib.nullcontext():
            model = open_clip.create_model(name, **kwargs)
    except Exception as error:
        failure = _load_failure(name, kwargs["pretrained"], error)
        if failure is None:
            raise
        raise failure from error
    model.eval()
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        weights_sha256=state_dict_digest(model.state_dict()),
    )


def _load_reference(image_size: int | None, device: str | torch.device) -> LoadedModel:
    """The shipped reference model: its architecture's config, its committed weights, its regenerated token table."""
    record = provenance()
    architecture = record["architecture"]
    model_cfg = _model_config(architecture, None)
    if image_size is not None and image_size != model_cfg["vision_cfg"]["image_size"]:
        raise PatcherError(f"{REFERENCE_NAME} was trained at {model_cfg['vision_cfg']['image_size']} px: drop "
                           "--image-size")
    with _random_init_expected():
        model = open_clip.create_model(architecture, device="cpu")
    digest = load_reference_weights(model)
    model.to(device).eval()
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
    return LoadedModel(model=model, tokenizer=open_clip.get_tokenizer(architecture), name=REFERENCE_NAME,
                       pretrained=None, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, weights_sha256=digest)


def _load_failure(name: str, pretrained: str | None, error: Exception) -> PatcherError | None:
    """The one-line error for a failed open_clip load: a bad local checkpoint (a refused pickle included), or
    weights that are not cached; None for an unexpected error."""
    first = " ".join(str(error).split())[:200]
    if pretrained and Path(pretrained).expanduser().is_file():
        if isinstance(error, pickle.UnpicklingError) and "weights only" in first.lower():
            return PatcherError(f"{pretrained} holds pickled Python objects, which patcher will not run (checkpoints "
                                "load with weights_only=True): pass a safetensors file or a plain state dict")
        return PatcherError(f"{pretrained} is not a usable {name} checkpoint ({type(error).__name__}: {first}): "
                            "pass an open_clip checkpoint of this model")
    if not isinstance(error, RuntimeError | FileNotFoundError | ValueError):
        return None
    if pretrained and os.environ.get("HF_HUB_OFFLINE") == "1":
        return PatcherError(f"weights {name}/{pretrained} are not cached and the model hub is unreachable: download "
                            "them on a connected machine and pass --pretrained FILE (or --model local-dir:DIR)")
    return PatcherError(f"could not load {name} ({pretrained}): {first}")


def build_from_config(config: Mapping[str, Any]) -> torch.nn.Module:
    """An open_clip model with random weights from an `open_clip_config.json` dict (for loading saved weights)."""
    with tempfile.TemporaryDirectory(prefix="patcher-config-") as folder:
        (Path(folder) / CONFIG_FILENAME).write_text(json.dumps(dict(config)))
        with _random_init_expected():
            model = open_clip.create_model(f"{LOCAL_DIR_PREFIX}{folder}", load_weights=False)
    return model.eval()
