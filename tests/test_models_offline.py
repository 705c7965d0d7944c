"""Pretrained tags with the model hub unreachable: a cached tag loads from its file with the tag's settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from patcher.models import load_clip, state_dict_digest

# A tag registered for the tiny config, the way open_clip registers its own (hub id, QuickGELU, preprocessing).
REGISTER = """
from open_clip import pretrained as registry
registry._PRETRAINED["patcher-tiny"] = {"cached": registry._pcfg(
    hf_hub="patcher-test/tiny/", quick_gelu=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))}
"""
LOAD = """
import json
from patcher.models import load_clip
loaded = load_clip("patcher-tiny", "cached")
block = loaded.model.visual.transformer.resblocks[0]
print(json.dumps({"digest": loaded.weights_sha256, "mean": loaded.preprocess_cfg["mean"],
                  "activation": type(block.mlp.gelu).__name__, "pretrained": loaded.pretrained}))
"""


def _hub_cache(root: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face cache holding patcher-test/tiny's open_clip_model.safetensors at revision main."""
    repo = root / "models--patcher-test--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    save_file(weights, str(snapshot / "open_clip_model.safetensors"))
    return root


def _run(script: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", "import patcher.models\n" + REGISTER + script], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_a_cached_tag_loads_from_the_cache_with_the_tags_settings(tmp_path: Path):
    torch.manual_seed(7)
    weights = {k: v.contiguous() for k, v in load_clip("patcher-tiny").model.state_dict().items()}
    result = _run(LOAD, _hub_cache(tmp_path / "hub", weights))
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["digest"] == state_dict_digest(weights)  # the cached file's weights, not random ones
    assert loaded["mean"] == [0.5, 0.5, 0.5] and loaded["activation"] == "QuickGELU"
    assert loaded["pretrained"] == "cached"


def test_an_uncached_tag_fails_at_once_with_advice(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    script = ("from patcher.base.errors import PatcherError\nfrom patcher.models import load_clip\n"
              "try:\n    load_clip('patcher-tiny', 'cached')\nexcept PatcherError as error:\n    print(error)\n")
    result = _run(script, tmp_path / "empty")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not cached and the model hub is unreachable" in result.stdout and "--pretrained FILE" in result.stdout
