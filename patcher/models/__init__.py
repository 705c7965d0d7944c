"""open_clip model loading: names, pretrained tags, local checkpoints and `local-dir:` folders."""

from patcher.models.clip_loader import LoadedModel, build_from_config, load_clip
from patcher.models.state import state_dict_digest

__all__ = [
    "LoadedModel",
    "build_from_config",
    "load_clip",
    "state_dict_digest",
]
