"""`patcher export`'s text tower: what it writes, that it is the tower the heads came from (the base model's, or a
FLYP run's interpolation at the chosen alpha), and that request-time heads are the build's heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from methods_support import make_small_fashion, make_tiny_model, tiny_build
from safetensors.torch import load_file

from patcher.base.errors import PatcherError
from patcher.export.contract import EXPORT_JSON, read_export_record
from patcher.export.metadata import read_metadata
from patcher.export.openvocab import LabelSet
from patcher.models import build_from_config, load_clip
from patcher.models.state import split_classifier_state
from patcher.runs.manifest import load_run
from patcher.stages.export import ExportOptions, export_run
from patcher.triton.onnxruntime_local import LocalModel

pytestmark = pytest.mark.slow


def _text_embeddings(path: Path, tokens: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["text_embedding"], {"tokens": tokens})[0]


def _stored_heads(run: Path, kind: str) -> dict[str, torch.Tensor]:
    return split_classifier_state(load_file(str(run / "models" / f"{kind}.safetensors")))[1]


def _request_time_heads_diff(export: Path, run: Path, kind: str) -> float:
    """Largest |request-time head - stored head| over the run's tasks, in cosine units (per task's scale)."""
    manifest = load_run(run).manifest
    local = LocalModel(export, kind)
    worst = 0.0
    for task, head in _stored_heads(run, kind).items():
        record = manifest.tasks[task]
        served = local.head(LabelSet(tuple(record.classnames), tuple(record.templates)))
        scale = float(head.norm(dim=0).mean())
        worst = max(worst, float(np.abs(served - head.numpy()).max() / scale))
    return worst


def test_the_text_tower_is_exported_beside_unchanged_image_graphs(tiny_run: Path, tiny_export: Path,
                                                                  tmp_path: Path) -> None:
    record = read_export_record(tiny_export / EXPORT_JSON)
    text = record.text
    assert text is not None and record.options.text_tower
    assert (text.input.name, text.input.dtype, text.input.shape) == ("tokens", "int64", [-1, 24])
    assert (text.output.name, text.output.shape) == ("text_embedding", [-1, record.outputs[0].shape[1]])
    assert text.tokenizer.vocabulary == "bpe_simple_vocab_16e6.txt.gz" and text.tokenizer.clean == "lower"
    assert (tiny_export / text.tokenizer.vocabulary).is_file()
    assert {m.file for m in text.models.values()} == {"text_zeroshot.onnx"}  # ft trains the image encoder only
    assert not text.models["patched"].trained and text.models["patched"].alpha == 0.0
    assert set(text.templates) == set(record.tasks)
    for report in text.parity["models"].values():
        assert report["passed"] and report["batch_sizes"][:2] == [1, 7]
        assert report["max_abs_diff"]["text_embedding"] < 1e-5
        assert max(report["head_max_cosine_diff"].values()) < 1e-5
        assert all(task["decisive_top1_agreement"] == 100.0 for task in report["tasks"].values())
    loaded = load_clip(load_run(tiny_run).manifest.model.name)
    assert text.models["patched"].logit_scale == pytest.approx(float(loaded.model.logit_scale.detach().exp()), rel=1e-6)
    metadata = read_metadata(tiny_export / "text_zeroshot.onnx")
    assert metadata["model"] == "zeroshot text tower" and json.loads(metadata["tokenizer"])["context_length"] == 24

    images_only = export_run(tiny_run, ExportOptions(out=tmp_path / "onnx", text=False))
    for name in ("patched.onnx", "zeroshot.onnx"):  # the image graphs do not change with the text tower
        assert (images_only / name).read_bytes() == (tiny_export / name).read_bytes()
    assert read_export_record(images_only / EXPORT_JSON).text is None
    assert sorted(p.name for p in images_only.iterdir()) == ["export.json", "patched.onnx", "samples", "zeroshot.onnx"]


def test_request_time_heads_are_the_builds_heads(tiny_run: Path, tiny_export: Path) -> None:
    for kind in ("patched", "zeroshot"):
        assert _request_time_heads_diff(tiny_export, tiny_run, kind) < 1e-5


def test_the_exported_tower_is_the_base_models_on_any_prompt(tiny_run: Path, tiny_export: Path) -> None:
    loaded = load_clip(load_run(tiny_run).manifest.model.name)
    prompts = ["a photo of a dog.", "zebra crossing at night", "T-shirt/top", "9"] * 3
    tokens = loaded.tokenizer(prompts)
    with torch.no_grad():
        expected = loaded.model.encode_text(tokens, normalize=True).numpy()
    got = _text_embeddings(tiny_export / "text_zeroshot.onnx", tokens.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def flyp(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A FLYP run (text tower trained, alpha 0.5) on a seeded tiny CLIP, and its export."""
    root = tmp_path_factory.mktemp("flyp")
    model = make_tiny_model(root / "model")
    run = tiny_build(model, "digits", make_small_fashion(root / "fashion"), root / "run", "flyp", alpha="0.5")
    return {"model": model, "run": run, "export": export_run(run, ExportOptions(out=root / "onnx"))}


def test_a_flyp_runs_text_tower_is_the_interpolation_at_the_chosen_alpha(flyp: dict) -> None:
    run, export = flyp["run"], flyp["export"]
    manifest = load_run(run).manifest
    text = read_export_record(export / EXPORT_JSON).text
    assert manifest.method.name == "flyp" and manifest.alpha.chosen == 0.5
    patched, zeroshot = text.models["patched"], text.models["zeroshot"]
    assert (patched.file, patched.trained, patched.alpha) == ("text_patched.onnx", True, 0.5)
    assert (zeroshot.file, zeroshot.trained, zeroshot.alpha) == ("text_zeroshot.onnx", False, 0.0)

    base = load_clip(flyp["model"])
    base_text = {k: v for k, v in base.model.state_dict().items() if not k.startswith("visual.")}
    finetuned = load_file(str(run / "text" / "finetuned.safetensors"))
    interpolated = {key: 0.5 * base_text[key] + 0.5 * finetuned[key] for key in base_text}
    stored = load_file(str(run / "text" / "patched.safetensors"))
    assert max(float((stored[k] - interpolated[k]).abs().max()) for k in stored) < 1e-6
    assert any(not torch.equal(finetuned[k], base_text[k]) for k in base_text)  # FLYP moved the tower

    model = build_from_config(json.loads((run / "open_clip_config.json").read_text()))
    model.load_state_dict(interpolated, strict=False)
    prompts = [template.format(name) for record in manifest.tasks.values()
               for name in record.classnames for template in record.templates]
    tokens = base.tokenizer(prompts)
    with torch.no_grad():
        expected = model.encode_text(tokens, normalize=True).numpy()
    got = _text_embeddings(export / "text_patched.onnx", tokens.numpy())
    diff = float(np.abs(got - expected).max())
    print(f"flyp: exported patched text tower vs the interpolation at alpha 0.5: max |diff| {diff:.2e} "
          f"over {len(prompts)} prompts")
    assert diff < 1e-5
    assert float(np.abs(got - _text_embeddings(export / "text_zeroshot.onnx", tokens.numpy())).max()) > 1e-3
    scale = np.exp(0.5 * float(base_text["logit_scale"]) + 0.5 * float(finetuned["logit_scale"]))
    assert patched.logit_scale == pytest.approx(float(scale), rel=1e-5)


def test_a_flyp_runs_request_time_heads_are_the_builds_heads(flyp: dict) -> None:
    for kind in ("patched", "zeroshot"):
        diff = _request_time_heads_diff(flyp["export"], flyp["run"], kind)
        print(f"flyp {kind}: request-time heads vs the build's: max |diff| {diff:.2e} (cosine units)")
        assert diff < 1e-5


def test_without_the_base_model_the_export_has_no_text_tower_or_fails_when_asked_for_one(
        tmp_path: Path, tiny_run: Path) -> None:
    model = make_tiny_model(tmp_path / "model", seed=1)
    run = tiny_build(model, "digits", make_small_fashion(tmp_path / "fashion"), tmp_path / "run")
    shutil.move(tmp_path / "model", tmp_path / "moved")
    with pytest.raises(PatcherError, match=r"base model, which does not load.*--no-text exports the image graphs"):
        export_run(run, ExportOptions(out=tmp_path / "onnx", text=True))
    assert not (tmp_path / "onnx").exists()
    for text in (None, False):  # by default, without the base model: the image graphs only, with a warning
        written = export_run(run, ExportOptions(out=tmp_path / f"onnx-{text}", text=text))
        record = read_export_record(written / EXPORT_JSON)
        assert record.text is None and not record.options.text_tower
    assert export_run(run, ExportOptions(out=tmp_path / "onnx-None")) == tmp_path / "onnx-None"  # up to date
    shutil.move(tmp_path / "moved", tmp_path / "model")
    make_tiny_model(tmp_path / "model", seed=2)  # the same folder, other weights
    with pytest.raises(PatcherError, match="holds other weights now: weights_sha256 differs"):
        export_run(run, ExportOptions(out=tmp_path / "onnx2", text=True))
    with pytest.raises(PatcherError, match=r"holds a different export \(text_tower False -> True\)"):
        export_run(run, ExportOptions(out=tmp_path / "onnx-None", text=True))
