"""`patcher export`: ONNX models of the tiny run, parity-checked, with metadata; bad input refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tolerances import TINY_INT8_TOLERANCE

from patcher.base.errors import PatcherError
from patcher.base.files import FileRecord
from patcher.base.records import to_json
from patcher.export.contract import EXPORT_FORMAT
from patcher.export.graph import load_graph, reference_outputs
from patcher.export.heldout import load_heldout
from patcher.export.metadata import read_metadata
from patcher.runs.layout import model_file
from patcher.runs.manifest import load_run
from patcher.stages.export import ExportOptions, export_run

TASKS = ["digits", "fashion-mnist"]
OUTPUTS = ["embedding", "logits_digits", "logits_fashion_mnist"]


@pytest.fixture(scope="module")
def plain(tiny_export: Path) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def variants(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "variants"
    return export_run(tiny_run, ExportOptions(out=out, fp16=True, int8=True, optimize=True, text=False,
                                              accuracy_tolerance=TINY_INT8_TOLERANCE))


def record(export_dir: Path) -> dict:
    return json.loads((export_dir / "export.json").read_text())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_writes_verified_models(plain: Path, tiny_run: Path) -> None:
    data = record(plain)
    assert sorted(p.name for p in plain.iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "export.json", "patched.onnx",
                                                        "samples", "text_zeroshot.onnx", "zeroshot.onnx"]
    assert data["format"] == EXPORT_FORMAT and data["opset"] == 17
    assert set(data["models"]) == {"patched", "zeroshot"}
    for entry in data["models"].values():
        assert {k: entry[k] for k in ("sha256", "bytes")} == to_json(FileRecord.of(plain / entry["file"]))
        assert entry["precision"] == "fp32"
    assert [o["name"] for o in data["outputs"]] == OUTPUTS
    size = list(load_run(tiny_run).manifest.model.preprocess.image_size)
    assert data["input"] == {"name": "image", "dtype": "float32", "shape": [-1, 3, *size]}
    for key, report in data["parity"]["models"].items():
        assert report["passed"], key
        assert max(report["max_abs_diff"].values()) <= 1e-3
        assert {task["decisive_top1_agreement"] for task in report["tasks"].values()} == {100.0}
        assert {1, 7, 64} <= set(report["batch_sizes"])


def test_one_session_serves_batch_1_7_64(plain: Path, tiny_run: Path) -> None:
    run = load_run(tiny_run)
    config = json.loads((tiny_run / "open_clip_config.json").read_text())
    heldout = load_heldout(["fashion-mnist"], config["preprocess_cfg"], per_task=72)
    graph = load_graph(config, tiny_run / model_file("patched"), run.tasks)
    expected = reference_outputs(graph, heldout.images)
    session = ort.InferenceSession(str(plain / "patched.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == OUTPUTS
    start = 0
    for batch in (1, 7, 64):
        rows = slice(start, start + batch)
        got = session.run(None, {"image": heldout.images[rows].numpy()})
        for output, want in zip(got, expected, strict=True):
            assert output.shape == tuple(want[rows].shape)
            assert np.abs(output - want[rows].numpy()).max() <= 1e-3
        assert (got[2].argmax(1) == expected[2][rows].numpy().argmax(1)).all()
        start += batch


def test_fp16_keeps_float32_io_and_agrees(variants: Path) -> None:
    data = record(variants)
    assert set(data["models"]) == {"patched", "zeroshot", "patched_fp16", "zeroshot_fp16", "patched_int8",
                                   "zeroshot_int8"}
    for key in ("patched_fp16", "zeroshot_fp16"):
        model = onnx.load(str(variants / f"{key}.onnx"))
        types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        assert types == {onnx.TensorProto.FLOAT}
        assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
        report = data["parity"]["models"][key]
        assert report["precision"] == "fp16" and report["passed"]
        assert min(task["decisive_top1_agreement"] for task in report["tasks"].values()) >= 99.5
    assert data["models"]["patched_fp16"]["bytes"] < 0.75 * data["models"]["patched"]["bytes"]


def test_int8_keeps_float32_io_and_passes_the_same_rule(variants: Path) -> None:
    data = record(variants)
    for key in ("patched_int8", "zeroshot_int8"):
        model = onnx.load(str(variants / f"{key}.onnx"))
        types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        assert types == {onnx.TensorProto.FLOAT}
        assert any(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)
        assert {node.op_type for node in model.graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
        report = data["parity"]["models"][key]
        assert report["precision"] == "int8" and report["passed"] and report["rule"]["decisive_margin"] == 0.1
        assert report["rule"]["accuracy_tolerance"] == TINY_INT8_TOLERANCE  # the user's tolerance, recorded
        assert read_metadata(variants / f"{key}.onnx")["precision"] == "int8"
    assert data["models"]["patched_int8"]["bytes"] < 0.5 * data["models"]["patched"]["bytes"]
    assert data["parity"]["thresholds"]["int8"]["accuracy_tolerance"] == TINY_INT8_TOLERANCE


def test_a_negative_accuracy_tolerance_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(PatcherError, match="accuracy-tolerance must be 0 points or more"):
        export_run(tiny_run, ExportOptions(out=tmp_path / "onnx", accuracy_tolerance=-1))
    assert not (tmp_path / "onnx").exists()


def structure(path: Path) -> tuple[list, list]:
    """A graph without its weights: every node (operator, inputs, outputs, attributes) and every initializer's
    name, type and shape."""
    graph = onnx.load(str(path)).graph
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in graph.node]
    weights = [(i.name, i.data_type, list(i.dims)) for i in graph.initializer]
    io = [v.SerializeToString() for v in [*graph.input, *graph.output]]
    return nodes + io, weights


@pytest.mark.parametrize("suffix", ["", "_fp16", "_int8"])
def test_patching_changes_only_initializer_values(variants: Path, plain: Path, tiny_run: Path, suffix: str) -> None:
    """Patching is free at inference: the patched graph is the zero-shot graph with other weights."""
    alpha = load_run(tiny_run).manifest.alpha.chosen
    for folder in (plain, variants) if not suffix else (variants,):
        patched, zeroshot = folder / f"patched{suffix}.onnx", folder / f"zeroshot{suffix}.onnx"
        assert structure(patched) == structure(zeroshot)
        values = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(zeroshot)).graph.initializer}
        changed = [i.name for i in onnx.load(str(patched)).graph.initializer
                   if not np.array_equal(numpy_helper.to_array(i), values[i.name])]
        assert bool(changed) == (alpha > 0)  # alpha 0 keeps the zero-shot weights


def test_optimised_models_are_portable_and_checked(variants: Path) -> None:
    data = record(variants)
    assert {entry["optimization"] for entry in data["models"].values()} == {"extended"}
    model = onnx.load(str(variants / "patched.onnx"))
    assert {opset.domain for opset in model.opset_import} <= {"", "com.microsoft"}
    assert read_metadata(variants / "patched.onnx")["optimization"] == "extended"
    assert data["parity"]["models"]["patched"]["passed"]


def test_metadata_round_trip(plain: Path, tiny_run: Path) -> None:
    run = load_run(tiny_run)
    data = record(plain)
    assert data["run"]["manifest_sha256"] == run.manifest_sha256
    assert data["preprocess"] == to_json(run.manifest.model.preprocess)
    assert data["alpha"] == run.manifest.alpha.chosen
    assert data["tasks"]["digits"]["classnames"] == run.manifest.classnames("digits")
    assert data["tasks"]["fashion-mnist"]["output"] == "logits_fashion_mnist"
    meta = read_metadata(plain / "patched.onnx")
    assert meta["model"] == "patched" and meta["precision"] == "fp32" and meta["opset"] == "17"
    assert float(meta["alpha"]) == data["alpha"]
    assert meta["run_manifest_sha256"] == run.manifest_sha256
    assert meta["preprocess"] == data["preprocess"] and meta["tasks"] == data["tasks"]
    assert meta["outputs"] == OUTPUTS
    session = ort.InferenceSession(str(plain / "zeroshot.onnx"), providers=["CPUExecutionProvider"])
    served = session.get_modelmeta().custom_metadata_map
    assert served["patcher.model"] == "zeroshot" and float(served["patcher.alpha"]) == 0.0
    assert json.loads(served["patcher.tasks"]) == data["tasks"]


def test_same_export_is_up_to_date(plain: Path, tiny_run: Path) -> None:
    before = (plain / "export.json").read_bytes()
    assert export_run(tiny_run, ExportOptions(out=plain)) == plain
    assert (plain / "export.json").read_bytes() == before


def test_different_export_refused_then_replaced_with_overwrite(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = export_run(run, ExportOptions(tasks=["digits"]))
    assert out == run / "onnx"
    data = record(out)
    assert [o["name"] for o in data["outputs"]] == ["embedding", "logits_digits"]
    with pytest.raises(PatcherError, match="different export"):
        export_run(run)
    assert record(out) == data
    export_run(run, ExportOptions(overwrite=True))
    assert [o["name"] for o in record(out)["outputs"]] == OUTPUTS
    assert leftovers(run) == []


def test_corrupted_weights_refused_and_nothing_written(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / model_file("zeroshot")
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(PatcherError, match="sha256"):
        export_run(run)
    assert not (run / "onnx").exists() and leftovers(run) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["gtsrb"]}, "has no task gtsrb"),
        ({"opset": 16}, "opset 16"),
        ({"tasks": []}, "no tasks"),
    ],
)
def test_bad_options_refused(tiny_run: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(PatcherError, match=message):
        export_run(tiny_run, ExportOptions(out=tmp_path / "out", **kwargs))
    assert list(tmp_path.iterdir()) == []


def test_not_a_run_refused(tmp_path: Path) -> None:
    with pytest.raises(PatcherError, match="not a patcher run"):
        export_run(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_folder_that_is_not_an_export_is_never_replaced(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PatcherError, match="not a patcher export"):
        export_run(tiny_run, ExportOptions(out=tmp_path, overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_model_failing_parity_is_not_written(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from patcher.export import parity

    monkeypatch.setitem(parity.RULES, "fp32", replace(parity.RULES["fp32"], max_abs_diff=0.0))
    with pytest.raises(PatcherError, match=r"patched.onnx fails the parity check .* max \|logits_digits diff\|"):
        export_run(tiny_run, ExportOptions(out=tmp_path / "out", images_per_task=16))
    assert list(tmp_path.iterdir()) == []
