"""Label sets at request time, served by `patcher serve` (the real bundled Triton) from the tiny run's export:
the open-vocabulary model reproduces the baked heads, a two-label set is the baked logits restricted in PyTorch,
bad input is one INVALID_ARG naming the item and the limit, embeddings equal the exported graphs', and the CLI
(served and in process) imports no torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from serving_support import (
    Served,
    classification_fields,
    environment,
    export_record,
    image_client_parse,
    image_client_preprocess,
)
from triton_support import requires_bundled_triton

from patcher.base.errors import PatcherError
from patcher.data.tasks import get_task
from patcher.triton.client import ClassifyOptions, Endpoint, classify_files
from patcher.triton.onnxruntime_local import LocalModel
from patcher.triton.openvocab_client import classify_labels, embed_files, embed_texts, served_templates
from patcher.triton.repository.configs import read_config
from patcher.triton.repository.writer import RepositoryOptions, write_repository

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
MAX_LABELS = 12
LABEL_CACHE = 2
FASHION_IMAGES = 400


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("openvocab") / "repo"
    write_repository(tiny_export, repo, RepositoryOptions(max_batch_size=32,
                     open_vocab={"max_labels": MAX_LABELS, "label_cache": LABEL_CACHE}))
    return repo


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    running = Served(repo, tmp_path_factory.mktemp("key") / "key.json")
    yield running
    assert running.stop() == 0


def _files(task: str, folder: Path, count: int | None = None) -> tuple[list[Path], np.ndarray]:
    """A task's test images as PNG files, and their labels."""
    data = get_task(task).dataset("test")
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for index in range(len(data) if count is None else min(count, len(data))):
        image, label = data[index]
        path = folder / f"{index:05d}.png"
        image.save(path)
        paths.append(path)
        labels.append(label)
    return paths, np.array(labels)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Path], np.ndarray]]:
    root = tmp_path_factory.mktemp("test-images")
    return {"digits": _files("digits", root / "digits"),
            "fashion-mnist": _files("fashion-mnist", root / "fashion", FASHION_IMAGES)}


@pytest.fixture(scope="module")
def torch_logits(tiny_run: Path):
    """The run's patched classifier in PyTorch with open_clip's preprocessing: task -> logits of image files."""
    from safetensors.torch import load_file

    from patcher.data.transforms import eval_transform
    from patcher.models import build_from_config
    from patcher.models.classifier import MultiHeadClassifier
    from patcher.models.state import split_classifier_state

    config = json.loads((tiny_run / "open_clip_config.json").read_text())
    model = build_from_config(config)
    encoder, heads = split_classifier_state(load_file(str(tiny_run / "models" / "patched.safetensors")))
    model.visual.load_state_dict(encoder)
    classifier = MultiHeadClassifier(model.visual, heads).eval()
    transform = eval_transform(config["preprocess_cfg"])

    def logits(paths: list[Path], task: str) -> np.ndarray:
        batch = torch.stack([transform(Image.open(path)) for path in paths])
        with torch.no_grad():
            return classifier(batch, task)[task].numpy()

    return logits


def _scores(results: list[dict], names: list[str]) -> np.ndarray:
    """[N, L] scores in label order from ranked results holding every label."""
    scores = np.full((len(results), len(names)), np.nan, np.float32)
    for row, result in enumerate(results):
        for entry in next(iter(result["tasks"].values())):
            scores[row, names.index(entry["label"])] = entry["score"]
    return scores


@pytest.mark.parametrize("task", ["digits", "fashion-mnist"])
def test_the_tasks_names_and_templates_reproduce_the_baked_logits(served: Served, tiny_export: Path, images,
                                                                  task: str) -> None:
    paths, _ = images[task]
    names = export_record(tiny_export)["tasks"][task]["classnames"]
    templates = served_templates("digits", Endpoint(url=served.grpc_url))[task]
    endpoint, options = Endpoint(url=served.grpc_url), ClassifyOptions(top_k=len(names))
    open_vocabulary = classify_labels(paths, "digits", names, templates, endpoint=endpoint, options=options)
    baked = classify_files(paths, "digits", endpoint=endpoint, options=options)
    assert {r["model"] for r in open_vocabulary} == {"digits_classify"}
    assert all(list(r["tasks"]) == ["labels"] for r in open_vocabulary)
    ours, theirs = _scores(open_vocabulary, names), _scores([{"tasks": {task: r["tasks"][task]}} for r in baked], names)
    agreement = float((ours.argmax(1) == theirs.argmax(1)).mean() * 100)
    print(f"{task}: --labels with its {len(names)} names and --templates {task}: top-1 agreement with the baked "
          f"logits {agreement:.2f}% on {len(paths)} test images, max |score - logit| {np.abs(ours - theirs).max():.1e}")
    assert agreement >= 99.5
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("task", "pair"), [("digits", ("3", "8")), ("fashion-mnist", ("sneaker", "ankle boot"))])
def test_a_two_label_set_is_the_baked_logits_restricted_to_those_classes(served: Served, tiny_export: Path, images,
                                                                         torch_logits, task: str,
                                                                         pair: tuple[str, str]) -> None:
    names = export_record(tiny_export)["tasks"][task]["classnames"]
    classes = [names.index(label) for label in pair]
    paths, labels = images[task]
    chosen = [i for i, label in enumerate(labels) if label in classes]
    subset, truth = [paths[i] for i in chosen], labels[chosen]
    templates = served_templates("digits", Endpoint(url=served.grpc_url))[task]
    results = classify_labels(subset, "digits", list(pair), templates, endpoint=Endpoint(url=served.grpc_url),
                              options=ClassifyOptions(top_k=2))
    served_classes = np.array([classes[r["tasks"]["labels"][0]["index"]] for r in results])
    restricted = torch_logits(subset, task)[:, classes]
    torch_classes = np.array(classes)[restricted.argmax(1)]
    decided = np.abs(restricted[:, 0] - restricted[:, 1]) > 1e-4
    served_accuracy, torch_accuracy = (served_classes == truth).mean() * 100, (torch_classes == truth).mean() * 100
    print(f"{task} {pair}: {len(subset)} test images, served two-label accuracy {served_accuracy:.2f}%, PyTorch's "
          f"baked logits restricted to those classes {torch_accuracy:.2f}%")
    assert len(subset) >= 20 and (served_classes[decided] == torch_classes[decided]).all()
    assert abs(served_accuracy - torch_accuracy) <= 100 * (~decided).sum() / len(subset)


def _infer(client: Any, inputs: dict[str, list[bytes]], shape_1: bool = False) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, values in inputs.items():
        array = np.array(values, dtype=np.object_)
        array = array.reshape(-1, 1) if name in ("image_bytes", "text") else array
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    model = "digits_text" if "text" in inputs else "digits_classify"
    result = client.infer(model, tensors)
    return result.as_numpy("text_embedding" if model == "digits_text" else "scores")


def test_bad_input_is_one_invalid_arg_naming_the_item_and_the_limit_and_the_server_keeps_answering(
        served: Served, images) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(served.grpc_url)
    image = [images["digits"][0][0].read_bytes()]
    good = {"image_bytes": image, "labels": [b"0", b"1"]}
    long_label = b"seven " * 30
    large = io.BytesIO()
    Image.new("L", (6000, 6000)).save(large, format="PNG")  # 36 megapixels, 35 KB: five exceed the request's 144
    bad = [
        ({**good, "image_bytes": [large.getvalue()] * 5}, "more than max_request_pixels=144000000"),
        ({**good, "labels": []}, "the label set is empty"),
        ({**good, "labels": [str(i).encode() for i in range(MAX_LABELS + 1)]},
         f"{MAX_LABELS + 1} labels exceed max_labels={MAX_LABELS}"),
        ({**good, "labels": [b"0", b"\xff\xfe"]}, "label 1 is not UTF-8"),
        ({**good, "templates": [b"a photo of a {}.", b"a photo"]}, "template 1 'a photo' must hold exactly one {}"),
        ({**good, "templates": [b"\xc3("]}, "template 0 is not UTF-8"),
        ({**good, "labels": [b"0", long_label]}, "label 'seven seven"),
        ({**good, "labels": [b"0", long_label]}, "more than the model's context_length=24 (open_clip would truncate"),
        ({**good, "image_bytes": [b"not an image"]}, "item 0: cannot decode image"),
        ({"text": [b"a dog", b"\xff"]}, "item 1: prompt is not UTF-8"),
        ({"text": [b"a dog", long_label]}, "item 1: prompt 'seven seven"),
    ]
    for inputs, message in bad:
        with pytest.raises(InferenceServerException) as raised:
            _infer(client, inputs)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value.message()
        assert message in raised.value.message()
        assert _infer(client, good).shape == (1, 2)  # and the next good request is answered
    client.close()


def test_the_classify_model_answers_probabilities_and_labelled_rankings_beside_its_logits(served: Served,
                                                                                       images) -> None:
    """`class_count` cannot know a request's labels (Triton's labels are files), so the model ranks them itself."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.grpc_url)
    paths = images["digits"][0][:3]
    labels = [b"zero", b"one", b"seven: a digit"]
    tensors = [grpcclient.InferInput("image_bytes", [len(paths), 1], "BYTES"),
               grpcclient.InferInput("labels", [3], "BYTES")]
    tensors[0].set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_).reshape(-1, 1))
    tensors[1].set_data_from_numpy(np.array(labels, dtype=np.object_))
    result = client.infer("digits_classify", tensors)
    scores, probs = result.as_numpy("scores"), result.as_numpy("probabilities")
    expected = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    for row, ranking in enumerate(result.as_numpy("classification")):
        parsed = [item.decode().split(":", 2) for item in ranking]
        assert [int(index) for _, index, _ in parsed] == list(np.argsort(-probs[row], kind="stable"))
        assert [label.encode() for _, index, label in parsed] == [labels[int(index)] for _, index, _ in parsed]
        np.testing.assert_allclose([float(p) for p, _, _ in parsed], np.sort(probs[row])[::-1], atol=1e-6)
    ranked = classify_labels(paths, "digits", [label.decode() for label in labels],
                             endpoint=Endpoint(url=served.grpc_url), options=ClassifyOptions(top_k=3))
    np.testing.assert_allclose([[e["probability"] for e in r["tasks"]["labels"]] for r in ranked],
                               np.sort(probs, axis=1)[:, ::-1], atol=1e-6)
    client.close()


def _text_executions(client: Any) -> int:
    stats = client.get_inference_statistics("digits_text", as_json=True)["model_stats"]
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)  # absent when 0


def test_a_label_sets_head_is_computed_once_and_the_cache_is_bounded(served: Served, images) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.grpc_url)
    image = [path.read_bytes() for path in images["digits"][0][:4]]
    sets = [[b"zero", b"one"], [b"two", b"three"], [b"four", b"five"]]
    before = _text_executions(client)
    first = _infer(client, {"image_bytes": image, "labels": sets[0]})
    assert _text_executions(client) == before + 1  # the head: one text-model request
    np.testing.assert_array_equal(_infer(client, {"image_bytes": image, "labels": sets[0]}), first)
    assert _text_executions(client) == before + 1  # repeated: the cached head, no text-model request
    for labels in sets[1:]:  # two new sets fill the cache (LABEL_CACHE = 2) and push the first out
        _infer(client, {"image_bytes": image, "labels": labels})
    assert _text_executions(client) == before + 3
    _infer(client, {"image_bytes": image, "labels": sets[0]})
    assert _text_executions(client) == before + 4
    _infer(client, {"image_bytes": image, "labels": sets[0], "templates": [b"a photo of {}."]})  # another key
    assert _text_executions(client) == before + 5
    client.close()


def test_served_embeddings_are_the_exported_graphs(served: Served, tiny_export: Path, images) -> None:
    local = LocalModel(tiny_export)
    paths = images["digits"][0][:40]
    names = [str(p) for p in paths]
    prompts = ["a photo of a dog.", "7", "T-shirt/top", "an ankle boot"] * 20
    np.testing.assert_allclose(embed_files(paths, "digits", endpoint=Endpoint(url=served.grpc_url)),
                               local.embed_images([p.read_bytes() for p in paths], names), atol=1e-5)
    np.testing.assert_allclose(embed_texts(prompts, "digits", endpoint=Endpoint(url=served.grpc_url), batch_size=64),
                               local.embed_texts(prompts), atol=1e-5)
    with pytest.raises(PatcherError, match=r"item 41: prompt is empty"):
        embed_texts([*prompts[:41], " "], "digits", endpoint=Endpoint(url=served.grpc_url), batch_size=16)


def test_the_image_embedding_model_follows_nvidias_image_conventions(served: Served, tiny_export: Path,
                                                                     images) -> None:
    """What image_client.py checks and sends; it then asks for the classification extension, which an embedding
    (no labels) answers with `score:index` only: the script prints `score (index) = label` and stops there."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.grpc_url)
    config = client.get_model_config("digits_embed").config
    parsed = image_client_parse(client.get_model_metadata("digits_embed"), config)
    max_batch, input_name, output_name, c, h, w, fmt, dtype = parsed
    record = export_record(tiny_export)
    assert (max_batch, input_name, output_name, c, dtype) == (32, "pixels", "embedding", 3, "FP32")
    assert [h, w] == record["preprocess"]["image_size"]
    batch = np.stack([image_client_preprocess(Image.open(p), fmt, c, h, w) for p in images["digits"][0][:8]])
    tensor = grpcclient.InferInput(input_name, list(batch.shape), dtype)
    tensor.set_data_from_numpy(batch)
    embedding = client.infer("digits_embed", [tensor]).as_numpy("embedding")
    mean = np.asarray(record["preprocess"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(record["preprocess"]["std"], np.float32).reshape(1, 3, 1, 1)
    local = LocalModel(tiny_export)
    (expected,) = local.image.run(["embedding"], {"image": (batch / 255.0 - mean) / std})
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    wanted = grpcclient.InferRequestedOutput(output_name, class_count=3)
    answer = client.infer("digits_embed", [tensor], outputs=[wanted]).as_numpy(output_name)
    with pytest.raises(AssertionError, match="is the output labelled"):
        classification_fields(answer[0][0])
    assert len(read_config(served.repo / "digits_embed").output) == 1
    client.close()


# Runs the real CLI, then reports which heavy packages the command imported (torch and open_clip must not be).
CLI_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('imported:', sorted(m for m in ('torch', 'open_clip') if m in sys.modules)))\n"
    "from patcher.cli.app import main\n"
    "sys.argv = ['patcher', *sys.argv[1:]]\n"
    "main()\n"
)


def _cli(*args: str) -> tuple[int, str, list[str]]:
    """`patcher ARGS` in a subprocess: exit code, output, and the heavy packages it imported."""
    done = subprocess.run([sys.executable, "-c", CLI_PROBE, *args], capture_output=True, text=True, timeout=180,
                          env=environment())
    imported = [line for line in done.stdout.splitlines() if line.startswith("imported:")]
    output = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("imported:"))
    return done.returncode, output + done.stderr, imported


def test_the_cli_served_and_in_process_imports_no_torch(served: Served, tiny_export: Path, images,
                                                        tmp_path: Path) -> None:
    width = export_record(tiny_export)["outputs"][0]["shape"][1]
    paths = [str(p) for p in images["digits"][0][:6]]
    names = ",".join(str(i) for i in range(10))
    code, output, imported = _cli("classify", *paths, "--model", "digits", "--url", served.grpc_url, "--labels",
                                  names, "--templates", "digits", "--json", "--top-k", "10")
    assert code == 0 and imported == ["imported: []"], output
    served_results = json.loads(output)
    code, output, imported = _cli("classify", *paths, "--run", str(tiny_export), "--labels", names, "--templates",
                                  "digits", "--json", "--top-k", "10")
    assert code == 0 and imported == ["imported: []"], output
    local_results = json.loads(output)
    for ours, theirs in zip(served_results, local_results, strict=True):
        assert [e["label"] for e in ours["tasks"]["labels"]] == [e["label"] for e in theirs["tasks"]["labels"]]
        np.testing.assert_allclose([e["score"] for e in ours["tasks"]["labels"]],
                                   [e["score"] for e in theirs["tasks"]["labels"]], atol=1e-4)
    template_file = tmp_path / "templates.txt"
    template_file.write_text("a photo of the number {}.\n\na drawing of {}\n")
    code, output, imported = _cli("classify", paths[0], "--run", str(tiny_export), "--labels", "3,8", "--templates",
                                  str(template_file))
    assert code == 0 and "labels:" in output and imported == ["imported: []"], output
    for target in ("--model", "--run"):
        where = ["digits", "--url", served.grpc_url] if target == "--model" else [str(tiny_export)]
        out = tmp_path / f"images{target}.npy"
        code, output, imported = _cli("embed", *paths, target, *where, "--out", str(out))
        assert code == 0 and imported == ["imported: []"] and np.load(out).shape == (6, width), output
        code, output, imported = _cli("embed", "--text", "a dog", "--text", "a cat", target, *where, "--out",
                                      str(tmp_path / "text.json"))
        records = json.loads((tmp_path / "text.json").read_text())
        assert code == 0 and imported == ["imported: []"] and [r["text"] for r in records] == ["a dog", "a cat"]
    code, output, _ = _cli("classify", paths[0], "--run", str(tiny_export), "--labels", "a,a")
    assert code == 2 and output.strip() == "error: label 1 'a' repeats label 0", output
    template_file.write_text("a photo of {}\nno {} {} twice\n")
    code, output, _ = _cli("classify", paths[0], "--model", "digits", "--url", served.grpc_url, "--labels", "a",
                           "--templates", str(template_file))
    assert code == 2 and output.count("error:") == 1, output
    assert "template 1 'no {} {} twice' must hold exactly one {}" in output


def test_in_process_classification_without_labels_gives_every_baked_task(tiny_export: Path, images) -> None:
    buffer = io.BytesIO()
    Image.open(images["digits"][0][0]).save(buffer, format="PNG")
    local = LocalModel(tiny_export)
    tasks = local.classify_tasks([buffer.getvalue()], ["x.png"], 3)
    assert set(tasks[0]) == {"digits", "fashion-mnist"} and len(tasks[0]["digits"]) == 3
