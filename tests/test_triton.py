"""Model repository, real tritonserver (bundled in nvidia-pytriton) and gRPC classification, end to end.

The export under test is `export_run(tiny_run)`: the session's tiny `patcher build`, exported to ONNX.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from tolerances import TINY_INT8_TOLERANCE
from triton_support import requires_bundled_triton
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.export.openvocab import probabilities
from patcher.triton.client import ClassifyOptions, Endpoint, classify_files
from patcher.triton.imaging import preprocess_image
from patcher.triton.repository.configs import read_config
from patcher.triton.repository.writer import RepositoryOptions, model_versions, write_repository
from patcher.triton.serving.ports import free_port
from patcher.triton.serving.processes import group_pids
from patcher.triton.serving.server import ServerPorts, ServerSettings, TritonServer

pytestmark = pytest.mark.slow
N_IMAGES = 300
MAX_BATCH = 64


needs_server = requires_bundled_triton()


@dataclass
class ExportCase:
    """An export directory and the PyTorch model (with open_clip's preprocessing) it was exported from."""

    path: Path
    torch_logits: Callable[[list[Image.Image]], dict[str, np.ndarray]]  # task -> [N, C], patched model


# --- exports ----------------------------------------------------------------------------------------------


def _export(run: Path, out: Path) -> ExportCase:
    """`patcher export` (fp32, fp16, int8) of the session's tiny run, with the run's PyTorch classifier as reference."""
    from safetensors.torch import load_file

    from patcher.data.transforms import eval_transform
    from patcher.models import build_from_config
    from patcher.models.classifier import MultiHeadClassifier
    from patcher.models.state import split_classifier_state
    from patcher.stages.export import ExportOptions, export_run

    export_dir = Path(export_run(run, ExportOptions(out=out, fp16=True, int8=True,
                                                         accuracy_tolerance=TINY_INT8_TOLERANCE)))
    config = json.loads((run / "open_clip_config.json").read_text())
    model = build_from_config(config)
    encoder, heads = split_classifier_state(load_file(str(run / "models" / "patched.safetensors")))
    model.visual.load_state_dict(encoder)
    classifier = MultiHeadClassifier(model.visual, heads).eval()
    transform = eval_transform(config["preprocess_cfg"])

    def torch_logits(images: list[Image.Image]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits = classifier(torch.stack([transform(image) for image in images]))
        return {task: value.numpy() for task, value in logits.items()}

    return ExportCase(export_dir, torch_logits)


@pytest.fixture(scope="module")
def case(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportCase:
    return _export(tiny_run, tmp_path_factory.mktemp("export") / "onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Image.Image]]:
    """Digits test images re-encoded as PNG files, and the decoded images."""
    from patcher.data.tasks import get_task

    test = get_task("digits").dataset("test")
    folder = tmp_path_factory.mktemp("digits-png")
    paths, decoded = [], []
    for index in range(min(N_IMAGES, len(test))):
        buffer = io.BytesIO()
        test[index][0].save(buffer, format="PNG")
        path = folder / f"{index:04d}.png"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
        decoded.append(Image.open(io.BytesIO(buffer.getvalue())))
    return paths, decoded


@pytest.fixture(scope="module")
def repo(case: ExportCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton_models")
    written = write_repository(case.path, repo, RepositoryOptions(max_batch_size=MAX_BATCH, preferred_batch_sizes=[16]))
    assert written.new_version and written.name == "digits" and written.version == 1
    return repo


@pytest.fixture(scope="module")
def server(repo: Path):
    with TritonServer(repo, settings=ServerSettings(startup_timeout_s=60)) as running:
        yield running


def _session(case: ExportCase, kind: str) -> ort.InferenceSession:
    data = json.loads((case.path / "export.json").read_text())
    return ort.InferenceSession(str(case.path / data["models"][kind]["file"]), providers=["CPUExecutionProvider"])


def _ort_logits(case: ExportCase, kind: str, images: list[Image.Image]) -> dict[str, np.ndarray]:
    data = json.loads((case.path / "export.json").read_text())
    batch = np.stack([preprocess_image(image, data["preprocess"]) for image in images])
    session = _session(case, kind)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {"image": batch}), strict=True))
    return {task: values[info["output"]] for task, info in data["tasks"].items()}


def _assert_same_top1(predicted: np.ndarray, logits: np.ndarray, what: str) -> None:
    """Equal top-1, except where the reference's best two logits tie within float noise."""
    ordered = np.sort(logits, axis=1)
    decided = (ordered[:, -1] - ordered[:, -2]) > 1e-4 * np.maximum(1.0, np.abs(ordered[:, -1]))
    assert decided.mean() > 0.95, f"{what}: too many near-ties to compare"
    agree = predicted[decided] == logits[decided].argmax(axis=1)
    assert agree.all(), f"{what}: top-1 differs on {int((~agree).sum())} of {int(decided.sum())} images"


# --- repository, no server ----------------------------------------------------------------------------------


def test_repository_layout_and_config_parse_back(case: ExportCase, repo: Path) -> None:
    data = json.loads((case.path / "export.json").read_text())
    expected = ["digits", "digits_classify", "digits_digits_bytes", "digits_digits_pixels", "digits_embed",
                "digits_fashion_mnist_bytes", "digits_fashion_mnist_pixels", "digits_patched", "digits_pixels",
                "digits_preprocess", "digits_text", "digits_zeroshot"]  # open-vocabulary models: test_open_vocab.py
    assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == expected
    for model in ("digits_patched", "digits_zeroshot"):
        config = read_config(repo / model)
        assert config.name == model and config.backend == "python" and config.max_batch_size == MAX_BATCH
        assert list(config.dynamic_batching.preferred_batch_size) == [16]
        assert config.instance_group[0].count == 1 and config.version_policy.latest.num_versions == 1
        (image,) = config.input
        assert image.name == "image" and list(image.dims) == data["input"]["shape"][1:]
        for task, info in data["tasks"].items():
            output = next(o for o in config.output if o.name == info["output"])
            assert list(output.dims) == [len(info["classnames"])]
            assert (repo / model / output.label_filename).read_text().splitlines() == info["classnames"], task
        assert {"model.onnx", "model.py", "patcher.json"} <= {p.name for p in (repo / model / "1").iterdir()}
    preprocess = read_config(repo / "digits_preprocess")
    assert preprocess.input[0].data_type == mc.TYPE_STRING and list(preprocess.input[0].dims) == [1]
    recorded = json.loads(preprocess.parameters["preprocess"].string_value)
    assert recorded["image_size"] == data["preprocess"]["image_size"]
    assert sorted(json.loads(preprocess.parameters["limits"].string_value)) == [
        "jpeg_draft", "max_aspect", "max_bytes", "max_pixels", "max_request_bytes", "max_request_pixels",
        "max_server_pixels"]
    assert not (repo / "digits_preprocess" / "1" / "preprocess.json").exists()  # the config is the one source
    assert read_config(repo / "digits_patched").parameters["preprocess_model"].string_value == "digits_preprocess"
    ensemble = read_config(repo / "digits")
    assert ensemble.platform == "ensemble" and [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "digits_preprocess",
        "digits_patched",
    ]
    assert all(o.label_filename for o in ensemble.output if o.name.startswith("logits_"))


def test_onnxruntime_flavour_config(case: ExportCase, tmp_path: Path) -> None:
    written = write_repository(
        case.path, tmp_path, RepositoryOptions(name="my_model", backend="onnxruntime", instances=2, tensorrt_fp16=True)
    )
    assert written.name == "my_model"
    config = read_config(tmp_path / "my_model_patched")
    assert config.platform == "onnxruntime_onnx" and not config.backend
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert (tmp_path / "my_model_patched" / "1" / "model.onnx").is_file()
    assert read_config(tmp_path / "my_model").platform == "ensemble"
    with pytest.raises(PatcherError, match="onnxruntime"):
        write_repository(case.path, tmp_path / "other", RepositoryOptions(tensorrt_fp16=True))


def test_same_export_gets_no_new_version(case: ExportCase, tmp_path: Path) -> None:
    first = write_repository(case.path, tmp_path)
    again = write_repository(case.path, tmp_path, RepositoryOptions(max_batch_size=8))
    assert first.new_version and not again.new_version and "already version 1" in again.message
    assert model_versions(tmp_path / "digits_patched") == [1]
    assert read_config(tmp_path / "digits_patched").max_batch_size == 8  # configs are refreshed
    assert not [p for p in (tmp_path / "digits_patched").iterdir() if p.name.startswith(".")]


def test_fp16_models_and_a_missing_precision(case: ExportCase, tmp_path: Path) -> None:
    data = json.loads((case.path / "export.json").read_text())
    written = write_repository(case.path, tmp_path / "repo", RepositoryOptions(precision="fp16"))
    assert written.precision == "fp16" and written.version == 1
    served = (tmp_path / "repo" / "digits_patched" / "1" / "model.onnx").read_bytes()
    assert served == (case.path / data["models"]["patched_fp16"]["file"]).read_bytes()
    assert read_config(tmp_path / "repo" / "digits_patched").input[0].data_type == mc.TYPE_FP32  # fp32 I/O kept
    assert write_repository(case.path, tmp_path / "repo").version == 2  # fp32 of the same export: a new version
    data["models"] = {key: value for key, value in data["models"].items() if value["precision"] == "fp32"}
    fp32_only = tmp_path / "fp32-only"
    shutil.copytree(case.path, fp32_only)
    (fp32_only / "export.json").write_text(json.dumps(data))
    with pytest.raises(PatcherError, match="no fp16 patched model"):
        write_repository(fp32_only, tmp_path / "other", RepositoryOptions(precision="fp16"))


@needs_server
def test_int8_models_are_served_and_answer_as_onnxruntime_does(case: ExportCase, tmp_path: Path, images) -> None:
    """`patcher triton --precision int8`: the int8 graph is what is served, and a real server answers with its
    logits (the same onnxruntime kernels run inside Triton's python backend)."""
    data = json.loads((case.path / "export.json").read_text())
    repo = tmp_path / "repo"
    written = write_repository(case.path, repo, RepositoryOptions(precision="int8", max_batch_size=MAX_BATCH))
    assert written.precision == "int8"
    served = (repo / "digits_patched" / "1" / "model.onnx").read_bytes()
    assert served == (case.path / data["models"]["patched_int8"]["file"]).read_bytes()
    paths, decoded = images
    with TritonServer(repo, models=["digits"], settings=ServerSettings(startup_timeout_s=60)) as running:
        results = classify_files(paths[:64], "digits", endpoint=Endpoint(url=running.grpc_url),
                                 options=ClassifyOptions(top_k=1, batch_size=16))
    predicted = np.array([int(r["tasks"]["digits"][0]["label"]) for r in results])
    scores = np.array([r["tasks"]["digits"][0]["score"] for r in results])
    # Dynamic quantisation scales activations over the whole batch, so outputs depend on batch-mates: compare
    # with onnxruntime on the same 16-image batches the client sent one at a time.
    int8_logits = np.concatenate([_ort_logits(case, "patched_int8", decoded[i:i + 16])["digits"]
                                  for i in range(0, 64, 16)])
    np.testing.assert_allclose(scores, int8_logits.max(axis=1), rtol=1e-4, atol=1e-4)
    _assert_same_top1(predicted, int8_logits, "triton int8 vs onnxruntime int8")


EXAMPLE = Path(__file__).resolve().parent.parent / "triton_models"
# weights (and the tokenizer's vocabulary, open_clip's), per-write records, the folder's own README
NOT_COMMITTED = ("model.onnx", "bpe_simple_vocab_16e6.txt.gz", "patcher.json", "README.md", "warm_head.npz")


def _deployed(repo: Path) -> dict[str, str]:
    """What a repository deploys besides weights and warmup samples: every file's text, by relative path (hidden
    files aside)."""
    files = [p.relative_to(repo) for p in sorted(repo.rglob("*")) if p.is_file() and p.name not in NOT_COMMITTED
             and "warmup" not in p.relative_to(repo).parts]
    hashes = re.compile(r'(key: "(?:run_manifest|onnx)_sha256"\s*value \{\s*string_value: ")[0-9a-f]{64}')
    floats = re.compile(r'(key: "(?:logit_scale|alpha)"\s*value \{\s*string_value: ")[0-9.e+-]+')  # CPU-dependent
    return {str(p): floats.sub(r"\1<float>", hashes.sub(r"\1<sha256>", (repo / p).read_text())) for p in files
            if not any(part.startswith(".") for part in p.parts)}


def test_the_committed_example_repository_is_what_patcher_triton_writes(case: ExportCase, tmp_path: Path) -> None:
    """triton_models/ shows what gets deployed: `patcher triton` of the tiny run, without its weights."""
    written = tmp_path / "triton_models"
    write_repository(case.path, written)
    if os.environ.get("PATCHER_UPDATE_EXAMPLE") == "1":  # regenerate the committed folder
        for relative, text in _deployed(written).items():
            (EXAMPLE / relative).parent.mkdir(parents=True, exist_ok=True)
            (EXAMPLE / relative).write_text(text)
        for relative in set(_deployed(EXAMPLE)) - set(_deployed(written)):
            (EXAMPLE / relative).unlink()
    assert _deployed(written) == _deployed(EXAMPLE), "out of date: PATCHER_UPDATE_EXAMPLE=1 pytest -k committed_example"
    assert len(_deployed(EXAMPLE)) > 20 and not list(EXAMPLE.rglob("model.onnx"))


def test_configs_explain_themselves(case: ExportCase, tmp_path: Path) -> None:
    """Issue 33 row 6: every model says what it is for; int8 and fp32 differ in their configs; the raw-pixels model
    and the normalised one are told apart; the patched model names its alpha."""
    record = json.loads((case.path / "export.json").read_text())
    configs = {}
    for precision in ("fp32", "int8"):
        repo = tmp_path / precision
        write_repository(case.path, repo, RepositoryOptions(precision=precision))
        configs[precision] = {model.name: read_config(model) for model in repo.iterdir()
                              if (model / "config.pbtxt").is_file()}
    described = {name: config.parameters["description"].string_value for name, config in configs["fp32"].items()}
    assert all(described.values()) and len(set(described.values())) == len(described)
    assert "CLIP-NORMALISED" in described["digits_patched"] and "RAW PIXELS" in described["digits_pixels"]
    assert described["digits"].startswith("START HERE")
    for precision in ("fp32", "int8"):
        assert configs[precision]["digits_patched"].parameters["precision"].string_value == precision
    alpha = configs["fp32"]["digits_patched"].parameters["alpha"].string_value
    assert float(alpha) == pytest.approx(record["models"]["patched"]["alpha"])
    assert configs["fp32"]["digits_zeroshot"].parameters["alpha"].string_value == "0"


# --- a real server ----------------------------------------------------------------------------------------


@needs_server
def test_grpc_classification_matches_onnxruntime_and_pytorch(case: ExportCase, server: TritonServer, images) -> None:
    paths, decoded = images
    results = classify_files(paths, "digits", endpoint=Endpoint(url=server.grpc_url),
                             options=ClassifyOptions(top_k=3, batch_size=16))
    assert len(results) == len(paths) and results[0]["version"] == "1"
    predicted = np.array([int(r["tasks"]["digits"][0]["label"]) for r in results])
    ort_logits = _ort_logits(case, "patched", decoded)
    torch_logits = case.torch_logits(decoded)
    np.testing.assert_allclose(ort_logits["digits"], torch_logits["digits"], atol=1e-3, rtol=1e-4)
    _assert_same_top1(predicted, ort_logits["digits"], "triton vs onnxruntime")
    _assert_same_top1(predicted, torch_logits["digits"], "triton vs pytorch")
    scores = np.array([r["tasks"]["digits"][0]["score"] for r in results])
    np.testing.assert_allclose(scores, ort_logits["digits"].max(axis=1), rtol=1e-4, atol=1e-4)
    top_probabilities = np.array([r["tasks"]["digits"][0]["probability"] for r in results])
    np.testing.assert_allclose(top_probabilities, probabilities(ort_logits["digits"]).max(axis=1), atol=1e-3)
    # a probability is the softmax over every class, not over the top-k shown: the whole ranking sums to 1 and its
    # first three are the top-3 answer's
    classes = ort_logits["digits"].shape[1]
    whole = classify_files(paths[:16], "digits", endpoint=Endpoint(url=server.grpc_url),
                           options=ClassifyOptions(top_k=classes, batch_size=16))
    for short, full in zip(results[:16], whole, strict=True):
        ranked = full["tasks"]["digits"]
        assert len(ranked) == classes and sum(e["probability"] for e in ranked) == pytest.approx(1, abs=1e-5)
        assert np.diff([e["probability"] for e in ranked]).max() <= 0
        np.testing.assert_allclose([e["probability"] for e in short["tasks"]["digits"]],
                                   [e["probability"] for e in ranked[:3]], atol=1e-5)
    for task in ort_logits:
        assert all(len(r["tasks"][task]) == 3 for r in results)
    raw = classify_files(paths[:40], "digits", endpoint=Endpoint(url=server.grpc_url), options=ClassifyOptions(top_k=3),
                         raw=True)
    assert [r["tasks"]["digits"][0]["label"] for r in raw] == [r["tasks"]["digits"][0]["label"] for r in results[:40]]


@needs_server
def test_batches_of_one_and_of_max_batch_size(server: TritonServer, images) -> None:
    import tritonclient.grpc as grpcclient

    paths, _ = images
    expected = classify_files(paths[:MAX_BATCH], "digits", endpoint=Endpoint(url=server.grpc_url),
                              options=ClassifyOptions(top_k=1, batch_size=1))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for size in (1, MAX_BATCH):
        tensor = grpcclient.InferInput("image_bytes", [size, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([p.read_bytes() for p in paths[:size]], dtype=np.object_).reshape(-1, 1))
        wanted = grpcclient.InferRequestedOutput("logits_digits", class_count=1)
        labels = client.infer("digits", [tensor], outputs=[wanted]).as_numpy("logits_digits").reshape(-1)
        assert len(labels) == size
        assert [label.decode().split(":")[2] for label in labels] == [
            r["tasks"]["digits"][0]["label"] for r in expected[:size]
        ]
    client.close()


@needs_server
def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(
    case: ExportCase, server: TritonServer, images, tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    data = json.loads((case.path / "export.json").read_text())
    height, width = data["preprocess"]["image_size"]
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def request(model: str, name: str, array: np.ndarray, datatype: str) -> str:
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [tensor], client_timeout=30)
        return error.value.message()

    oversize = request("digits_patched", "image", np.zeros((MAX_BATCH + 1, 3, height, width), np.float32), "FP32")
    assert "batch" in oversize and str(MAX_BATCH) in oversize
    assert "FP64" in request("digits_patched", "image", np.zeros((2, 3, height, width), np.float64), "FP64")
    assert "shape" in request("digits_patched", "image", np.zeros((2, 3, height + 1, width), np.float32), "FP32")
    garbage = np.array([[b"definitely not an image"]], dtype=np.object_)
    assert "cannot decode image" in request("digits", "image_bytes", garbage, "BYTES")
    client.close()

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = images[0]
    with pytest.raises(PatcherError, match=r"bad\.png is not a readable image"):
        classify_files([*paths[:3], bad], "digits", endpoint=Endpoint(url=server.grpc_url))
    with pytest.raises(PatcherError, match=r"cannot read image file .*missing\.png"):
        classify_files([tmp_path / "missing.png"], "digits", endpoint=Endpoint(url=server.grpc_url))
    with pytest.raises(PatcherError, match=r"no ready model 'nope'.*digits_patched"):
        classify_files(paths[:1], "nope", endpoint=Endpoint(url=server.grpc_url))
    unreachable = f"127.0.0.1:{free_port()}"
    with pytest.raises(PatcherError, match=rf"no Triton server answers at {unreachable}.*patcher serve"):
        classify_files(paths[:1], "digits", endpoint=Endpoint(url=unreachable, timeout_s=5))
    assert len(classify_files(paths[:5], "digits", endpoint=Endpoint(url=server.grpc_url))) == 5


@needs_server
def test_a_model_that_fails_to_load_is_reported(tmp_path: Path) -> None:
    model = tmp_path / "broken" / "1"
    model.mkdir(parents=True)
    (model / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('broken on purpose')\n"
    )
    config = [
        'name: "broken" backend: "python" max_batch_size: 1',
        'input { name: "x" data_type: TYPE_FP32 dims: 1 }',
        'output { name: "y" data_type: TYPE_FP32 dims: 1 }',
    ]
    (tmp_path / "broken" / "config.pbtxt").write_text("\n".join(config) + "\n")
    with pytest.raises(PatcherError, match="nope"):
        TritonServer(tmp_path, models=["nope"]).start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PatcherError, match=r"port .* is in use"):
            TritonServer(tmp_path, ports=ServerPorts(grpc=taken.getsockname()[1])).start()
    server = TritonServer(tmp_path, settings=ServerSettings(startup_timeout_s=30, log_path=tmp_path / "server.log"))
    with pytest.raises(PatcherError, match=r"broken.*broken on purpose"):
        server.start()
    assert server.process is None and not server.stray_pids and not server.shm_segments()


# Runs the real CLI, then reports which heavy packages the command imported (torch and open_clip must not be).
CLI_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('imported:', sorted(m for m in ('torch', 'open_clip') if m in sys.modules)))\n"
    "from patcher.cli.app import main\n"
    "sys.argv = ['patcher', *sys.argv[1:]]\n"
    "main()\n"
)


def cli_probe(*args: str, **popen: Any) -> subprocess.Popen:
    """`patcher ARGS` in a subprocess that prints, on exit, the heavy packages it imported."""
    return subprocess.Popen([sys.executable, "-c", CLI_PROBE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_patcher_triton_imports_neither_torch_nor_open_clip(tiny_export: Path, tmp_path: Path) -> None:
    output, _ = cli_probe("triton", str(tiny_export), "--repo", str(tmp_path / "repo")).communicate(timeout=120)
    assert "wrote version 1" in output and "imported: []" in output, output


@needs_server
def test_patcher_serve_and_classify_import_no_torch_and_serve_stops_cleanly_on_sigint(repo: Path, images) -> None:
    grpc_port = free_port()
    process = cli_probe("serve", "--repo", str(repo), "--models", "digits", "--http-port", str(free_port()),
                        "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()))
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any(f"127.0.0.1:{grpc_port}" in line for line in lines), "".join(lines)
        assert len(classify_files(images[0][:2], "digits", endpoint=Endpoint(url=f"127.0.0.1:{grpc_port}"))) == 2
        classified, _ = cli_probe("classify", str(images[0][0]), "--model", "digits", "--url",
                                  f"127.0.0.1:{grpc_port}", "--json").communicate(timeout=60)
        assert '"tasks"' in classified and "imported: []" in classified, classified
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "stopped" in output and "imported: []" in output, output
    assert not [
        p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_mentions(p, f"--grpc-port={grpc_port}")
    ]


def _cmdline_mentions(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@needs_server
def test_stop_leaves_no_process_and_no_shared_memory(server: TritonServer) -> None:
    pgid = server.process.pid
    assert server.shm_segments(), "python-backend models should hold /dev/shm segments while serving"
    server.stop()
    assert not server.running() and not group_pids(pgid)
    assert not server.stray_pids and not server.shm_leftovers and not server.shm_segments()
    assert server.timings["stop_s"] < 15
