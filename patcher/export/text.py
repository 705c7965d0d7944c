"""The text tower as ONNX: token ids in, L2-normalised text embeddings out, so that label sets can be given at
request time. The tower of each exported model is the one its heads were built with: the base model's for methods
that train the image encoder only, the run's interpolated `text/<kind>.safetensors` for those that train it (FLYP).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import load_file
from torch import nn

from patcher.base.errors import PatcherError
from patcher.base.faults import naming
from patcher.base.files import sha256_file
from patcher.base.records import to_json
from patcher.base.versions import versions
from patcher.export.contract import TEXT_INPUT, TEXT_OUTPUT, TokenizerSpec
from patcher.export.metadata import METADATA_PREFIX
from patcher.export.tokenizer import VOCABULARY_FILE, ClipTokenizer
from patcher.export.trace import BATCH_DIM, TRACE_BATCH, mha_fastpath_disabled
from patcher.models import LoadedModel, build_from_config, load_clip
from patcher.runs.layout import VISUAL_PREFIX
from patcher.runs.manifest import Run

NO_TEXT = "--no-text exports the image graphs only"
CLEANINGS = {"_clean_lower": "lower", "_clean_whitespace": "whitespace", "_clean_canonicalize": "canonicalize"}


class TextGraph(nn.Module):
    """A CLIP model's text tower: token ids [N, context] -> normalize(encode_text) [N, D]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model.visual = nn.Identity()  # not part of this graph
        self.model = model.eval()

    @property
    def context_length(self) -> int:
        """Tokens per prompt the tower takes."""
        return int(self.model.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        """The embedding width D."""
        projection = self.model.text_projection
        return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): what a head's class columns are multiplied by."""
        return float(self.model.logit_scale.detach().exp())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings."""
        return self.model.encode_text(tokens, normalize=True)


def base_model(run: Run) -> LoadedModel:
    """The model the run started from (its text tower and tokenizer), checked against the manifest's digest."""
    model = run.manifest.model
    try:
        loaded = load_clip(model.name, model.pretrained, model.image_size)
    except PatcherError as error:
        raise PatcherError(f"the text tower comes from the run's base model, which does not load: {error} "
                           f"({NO_TEXT})") from None
    if loaded.weights_sha256 != model.weights_sha256:
        where = "random weights, not reproducible" if model.pretrained is None and ":" not in model.name else (
            f"{model.pretrained or model.name} holds other weights now")
        raise PatcherError(f"{model.name} does not load with the weights run {run.name} was built from ({where}: "
                           "weights_sha256 differs); the text tower must be the one its heads came from "
                           f"({NO_TEXT})")
    return loaded


def text_state(run: Run, kind: str, base: LoadedModel) -> tuple[dict[str, torch.Tensor], bool]:
    """(the text tower's state of `kind`, trained?): the run's `text/<kind>.safetensors` where the method trained
    one (the interpolation at the chosen alpha for `patched`), else the base model's."""
    files = run.manifest.text_tower.files
    if run.manifest.text_tower.trained and kind in files:
        return load_file(str(run.verified_file(files[kind]))), True
    state = {key: value for key, value in base.model.state_dict().items() if not key.startswith(VISUAL_PREFIX)}
    return state, False


def load_text_graph(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> TextGraph:
    """The text tower of an `open_clip_config.json` model with these weights (every non-image tensor)."""
    model = build_from_config(json.loads(json.dumps(config)))
    expected = {key for key in model.state_dict() if not key.startswith(VISUAL_PREFIX)}
    if set(state) != expected:
        first = sorted(set(state) ^ expected)[0]
        raise PatcherError(f"the text tower does not fit open_clip_config.json ({first}): rebuild the run")
    model.load_state_dict(dict(state), strict=False)
    return TextGraph(model)


def tokenizer_spec(loaded: LoadedModel, context_length: int) -> tuple[TokenizerSpec, Path]:
    """What export.json records of the tokenizer, and the vocabulary file to copy; PatcherError for a tokenizer that
    is not open_clip's CLIP BPE (HF tokenizers are not served)."""
    from patcher.base.compat import import_open_clip

    open_clip = import_open_clip()
    tokenizer = loaded.tokenizer
    if type(tokenizer).__name__ != "SimpleTokenizer" or getattr(tokenizer, "reduction_fn", None) is not None:
        raise PatcherError(f"{loaded.name} tokenizes with {type(tokenizer).__name__}, not open_clip's CLIP BPE "
                           f"SimpleTokenizer: its text tower cannot be served ({NO_TEXT})")
    clean = CLEANINGS.get(getattr(tokenizer.clean_fn, "__name__", ""))
    if clean is None:
        raise PatcherError(f"{loaded.name}'s tokenizer cleans text in a way patcher does not serve ({NO_TEXT})")
    vocabulary = Path(loaded.model_cfg.get("text_cfg", {}).get("tokenizer_kwargs", {}).get(
        "bpe_path", open_clip.tokenizer.default_bpe()))
    if int(tokenizer.context_length) != context_length:
        raise PatcherError(f"the tokenizer's context length {tokenizer.context_length} is not the text tower's "
                           f"{context_length}: the model's configuration is inconsistent ({NO_TEXT})")
    return TokenizerSpec(VOCABULARY_FILE, sha256_file(vocabulary), context_length, clean), vocabulary


def copy_vocabulary(vocabulary: Path, folder: Path) -> Path:
    """The tokenizer's vocabulary, copied into the export directory."""
    target = folder / VOCABULARY_FILE
    with naming(target):
        shutil.copyfile(vocabulary, target)
    return target


def run_prompts(run: Run, tasks: list[str]) -> dict[str, list[str]]:
    """Each task's prompts in open_clip's order (class-major, template-minor), as the build made its heads."""
    prompts = {}
    for task in tasks:
        record = run.manifest.tasks[task]
        prompts[task] = [template.format(name) for name in record.classnames for template in record.templates]
    return prompts


def check_tokenizer(loaded: LoadedModel, spec: TokenizerSpec, vocabulary: Path, prompts: list[str]) -> None:
    """PatcherError unless patcher's torch-free tokenizer gives open_clip's token ids for every prompt."""
    ours = ClipTokenizer(vocabulary, spec.context_length, spec.clean)
    theirs = loaded.tokenizer(prompts).numpy()
    mine = ours(prompts)
    differing = np.flatnonzero((theirs != mine).any(axis=1))
    if len(differing):
        raise PatcherError(f"patcher's tokenizer differs from open_clip's on {len(differing)} of the run's prompts, "
                           f"e.g. {prompts[differing[0]]!r}: the served text model would not match ({NO_TEXT})")


def export_text_onnx(graph: TextGraph, path: Path, opset: int) -> onnx.ModelProto:
    """Trace the text tower at batch 2 with a dynamic batch axis; the model with its shapes stated."""
    example = torch.zeros(TRACE_BATCH, graph.context_length, dtype=torch.long)
    example[:, 0], example[:, 1] = 49406, 49407
    with naming(path), warnings.catch_warnings(), mha_fastpath_disabled(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=[TEXT_INPUT], output_names=[TEXT_OUTPUT],
                          dynamic_axes={TEXT_INPUT: {0: BATCH_DIM}, TEXT_OUTPUT: {0: BATCH_DIM}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(path))
    for value, width in ((model.graph.input[0], graph.context_length), (model.graph.output[0], graph.width)):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = BATCH_DIM
        dims[1].dim_value = width
    return model


def text_metadata(run: Run, kind: str, alpha: float, trained: bool, spec: TokenizerSpec,
                  logit_scale: float) -> dict[str, str]:
    """What a text model's ONNX file says about itself."""
    props = {"model": f"{kind} text tower", "run": run.name, "run_manifest_sha256": run.manifest_sha256,
             "alpha": repr(alpha), "trained": json.dumps(trained), "input": TEXT_INPUT, "output": TEXT_OUTPUT,
             "tokenizer": json.dumps(to_json(spec)), "logit_scale": repr(logit_scale),
             "versions": json.dumps(versions())}
    return {f"{METADATA_PREFIX}{key}": value for key, value in props.items()}


