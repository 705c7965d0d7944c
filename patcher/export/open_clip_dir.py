"""`patcher export RUN --open-clip DIR`: the patched model as a folder open_clip loads unchanged with
`open_clip.create_model_and_transforms("local-dir:DIR")`.

    DIR/open_clip_config.json        the run's model_cfg and preprocess_cfg (open_clip's local-dir format)
    DIR/open_clip_model.safetensors  the whole CLIP: the patched image encoder, the text tower the heads came from
    DIR/patcher_tasks.json           each task's class names and templates (the zero-shot heads' inputs)
    DIR/README.md                    a model card: base model, what was patched, alpha, the accuracy table

The text tower is the run's own where its method trained one (FLYP), else the base model's, checked against the
digest the run recorded: zero-shot heads built from it with the run's class names are the heads the build baked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from patcher.base.errors import PatcherError
from patcher.base.staging import staged_output
from patcher.export.text import base_model, text_state
from patcher.models import build_from_config
from patcher.models.state import split_classifier_state
from patcher.runs.layout import KINDS, VISUAL_PREFIX
from patcher.runs.manifest import Manifest, Run, load_run
from patcher.runs.weights import verified_config

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
TASKS = "patcher_tasks.json"
CARD = "README.md"


def write_open_clip_dir(run_path: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the run's patched model into `out` as an open_clip local-dir folder; `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PatcherError(f"{out} already exists: pass --overwrite to replace it, or another --open-clip folder")
    run = load_run(run_path)
    config = verified_config(run)
    state = patched_state(run, config)
    with staged_output(out, overwrite=overwrite) as staging:
        folder = staging.open()
        (folder / CONFIG).write_text(json.dumps({"model_cfg": config["model_cfg"],
                                                 "preprocess_cfg": config.get("preprocess_cfg", {})}, indent=2))
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt", "patched_from": run.name,
                                                           "alpha": f"{run.manifest.alpha.chosen:g}"})
        manifest = run.manifest
        tasks = {task: {"role": record.role, "classnames": list(record.classnames),
                        "templates": list(record.templates)} for task, record in manifest.tasks.items()}
        (folder / TASKS).write_text(json.dumps(tasks, indent=2))
        (folder / CARD).write_text(model_card(manifest, out))
    return out


def patched_state(run: Run, config: dict[str, Any]) -> dict[str, Any]:
    """The whole CLIP state dict: the patched image encoder and its text tower, checked to fit the config."""
    encoder, _ = split_classifier_state(load_file(str(run.verified_file("models/patched.safetensors"))))
    text, _ = text_state(run, "patched", base_model(run))
    state = {**{key: value.contiguous() for key, value in text.items()},
             **{f"{VISUAL_PREFIX}{key}": value.contiguous() for key, value in encoder.items()}}
    model = build_from_config(json.loads(json.dumps(config)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise PatcherError(f"the patched weights do not fit {CONFIG} ({first}): rebuild the run")
    return {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}


def model_card(manifest: Manifest, out: Path) -> str:
    """README.md: what the model is, what was patched and how, its accuracy, and how to load it."""
    base = manifest.model
    pretrained = f" ({base.pretrained})" if base.pretrained else ""
    rows = [f"| {task} | {record.role} | " + " | ".join(f"{manifest.test_accuracy[kind][task]:.2f}" for kind in KINDS)
            + f" | {manifest.test_accuracy['patched'][task] - manifest.test_accuracy['zeroshot'][task]:+.2f} |"
            for task, record in manifest.tasks.items()]
    lines = [
        f"# {manifest.name}: {base.name}{pretrained}, patched on {', '.join(manifest.patch_tasks)}",
        "",
        f"A CLIP model patched by patcher (PAINT / WiSE-FT): the image encoder fine-tuned on "
        f"{', '.join(manifest.patch_tasks)} with the method `{manifest.method.name}`, then interpolated with the "
        f"zero-shot weights, theta = (1 - alpha) * zero-shot + alpha * fine-tuned, at **alpha = "
        f"{manifest.alpha.chosen:g}**, chosen so that the supported tasks "
        f"({', '.join(manifest.support_tasks) or 'none'}) keep their accuracy. The text tower is "
        f"{'the one the method trained' if manifest.text_tower.trained else 'the base model' + chr(39) + 's'}.",
        "",
        "## Test accuracy (%)",
        "",
        "| task | role | zero-shot | fine-tuned | patched | patched - zero-shot |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        "## Use it",
        "",
        "```python",
        "import open_clip",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{out}")',
        "```",
        "",
        f"Each task's class names and prompt templates are in `{TASKS}`: "
        "`open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates)` gives its head.",
        "",
    ]
    return "\n".join(lines)
