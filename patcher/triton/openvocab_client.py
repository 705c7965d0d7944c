"""Ask a served entry's open-vocabulary models over gRPC: classify images against a label set given now, embed
images and prompts. Model names follow the entry (`<name>_classify`, `<name>_text`, `<name>` for images)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.export.contract import EMBEDDING_OUTPUT, TEXT_OUTPUT
from patcher.export.openvocab import rank
from patcher.triton.client import (
    ClassifyOptions,
    Endpoint,
    connected,
    describe_model,
    grpc_modules,
    infer_error,
    known_models,
    read_image_file,
)
from patcher.triton.item_errors import item_error
from patcher.triton.repository.configs import IMAGE_BYTES

SUFFIXES = ("_classify", "_text", "_embed")


def entry_of(model: str) -> str:
    """The entry a model name belongs to (`digits_classify` -> `digits`); an entry name as it is."""
    for suffix in SUFFIXES:
        if model.endswith(suffix):
            return model.removesuffix(suffix)
    return model


def _parameters(client: Any, model: str, endpoint: Endpoint) -> dict[str, str]:
    _, InferenceServerException = grpc_modules()
    try:
        config = client.get_model_config(model, as_json=True, client_timeout=endpoint.timeout_s)["config"]
    except InferenceServerException as error:
        raise PatcherError(f"the server at {endpoint.url} has no ready model {model!r} ({error.message()}): is the "
                           "entry's export older than its text tower (re-run `patcher export` and `patcher triton`)? "
                           f"its models: {known_models(client, endpoint.timeout_s, endpoint.headers())}") from None
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def served_templates(model: str, endpoint: Endpoint = Endpoint()) -> dict[str, list[str]]:
    """The prompt templates of the served entry's tasks, from its open-vocabulary model's config."""
    with connected(endpoint) as client:
        parameters = _parameters(client, f"{entry_of(model)}_classify", endpoint)
    return json.loads(parameters.get("templates") or "{}")


def resolve_templates(spec: str, known: dict[str, list[str]]) -> list[str] | None:
    """`--templates`: a file (one template per line with `{}`), else a task of `known`; None when it is neither."""
    path = Path(spec)
    if path.is_file():
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as error:
            raise PatcherError(f"cannot read templates file {path}: {error}") from None
        templates = [line for line in lines if line]
        if not templates:
            raise PatcherError(f"templates file {path} holds no template: one per line, each with {{}}")
        return templates
    return list(known[spec]) if spec in known else None


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([value.encode("utf-8") for value in values], dtype=np.object_)


def classify_labels(paths: list[Path], model: str, labels: Sequence[str], templates: Sequence[str] | None = None, *,
                    endpoint: Endpoint = Endpoint(), options: ClassifyOptions = ClassifyOptions()) -> list[dict]:
    """Per image file, the label set's top-k labels with scores, from `<entry>_classify`; each result's `tasks`
    holds one entry, `labels`, ranked as the baked tasks are."""
    grpcclient, InferenceServerException = grpc_modules()
    options.check()
    url, timeout_s, top_k = endpoint.url, endpoint.timeout_s, options.top_k
    target = f"{entry_of(model)}_classify"
    with connected(endpoint) as client:
        parameters = _parameters(client, target, endpoint)
        version = str(client.get_model_metadata(target, as_json=True).get("versions", ["?"])[-1])
        step = min(options.batch_size, int(parameters.get("max_images", options.batch_size)))
        names = tuple(labels)
        results: list[dict] = []
        for start in range(0, len(paths), step):
            chunk = [Path(p) for p in paths[start : start + step]]
            images = grpcclient.InferInput(IMAGE_BYTES, [len(chunk), 1], "BYTES")
            images.set_data_from_numpy(np.array([read_image_file(p) for p in chunk], dtype=np.object_).reshape(-1, 1))
            inputs = [images, grpcclient.InferInput("labels", [len(names)], "BYTES")]
            inputs[1].set_data_from_numpy(_strings(names))
            if templates is not None:
                inputs.append(grpcclient.InferInput("templates", [len(templates)], "BYTES"))
                inputs[2].set_data_from_numpy(_strings(templates))
            try:
                wanted = [grpcclient.InferRequestedOutput(name) for name in ("scores", "probabilities")]
                response = client.infer(target, inputs, outputs=wanted, client_timeout=timeout_s)
            except InferenceServerException as error:
                raise infer_error(error, chunk, target, url) from None
            scores, probs = response.as_numpy("scores"), response.as_numpy("probabilities")
            for path, ranked in zip(chunk, rank(scores, names, top_k, probs), strict=True):
                results.append({"file": str(path), "model": target, "version": version, "tasks": {"labels": ranked}})
        return results


def embed_files(paths: list[Path], model: str, *, endpoint: Endpoint = Endpoint(), batch_size: int = 16
                ) -> np.ndarray:
    """[N, D] L2-normalised image embeddings of image files, from the entry's ensemble (the server preprocesses)."""
    grpcclient, InferenceServerException = grpc_modules()
    url, timeout_s = endpoint.url, endpoint.timeout_s
    target = entry_of(model)
    with connected(endpoint) as client:
        served = describe_model(client, target, url, timeout_s, endpoint.headers())
        step = min(batch_size, served.max_batch_size) if served.max_batch_size > 0 else 1
        parts = []
        for start in range(0, len(paths), step):
            chunk = [Path(p) for p in paths[start : start + step]]
            images = grpcclient.InferInput(IMAGE_BYTES, [len(chunk), 1], "BYTES")
            images.set_data_from_numpy(np.array([read_image_file(p) for p in chunk], dtype=np.object_).reshape(-1, 1))
            try:
                response = client.infer(target, [images], outputs=[grpcclient.InferRequestedOutput(EMBEDDING_OUTPUT)],
                                        client_timeout=timeout_s)
            except InferenceServerException as error:
                raise infer_error(error, chunk, target, url) from None
            parts.append(response.as_numpy(EMBEDDING_OUTPUT))
        return np.concatenate(parts)


def embed_texts(texts: Sequence[str], model: str, *, endpoint: Endpoint = Endpoint(), batch_size: int = 64
                ) -> np.ndarray:
    """[N, D] L2-normalised text embeddings of prompts, from `<entry>_text`."""
    grpcclient, InferenceServerException = grpc_modules()
    url, timeout_s = endpoint.url, endpoint.timeout_s
    target = f"{entry_of(model)}_text"
    with connected(endpoint) as client:
        _parameters(client, target, endpoint)
        limit = int(client.get_model_config(target, as_json=True)["config"].get("max_batch_size", 1)) or 1
        step = min(batch_size, limit)
        parts = []
        for start in range(0, len(texts), step):
            chunk = list(texts[start : start + step])
            prompts = grpcclient.InferInput("text", [len(chunk), 1], "BYTES")
            prompts.set_data_from_numpy(_strings(chunk).reshape(-1, 1))
            try:
                parts.append(client.infer(target, [prompts], client_timeout=timeout_s).as_numpy(TEXT_OUTPUT))
            except InferenceServerException as error:
                message = error.message() or str(error)
                item = item_error(message)
                shown = str(item.shifted(start)) if item else message  # numbered in the whole list, not the request
                raise PatcherError(f"{target} on {url} refused the request: {shown}") from None
        return np.concatenate(parts)


def save_embeddings(out: Path, keys: Sequence[str], embeddings: np.ndarray, what: str) -> None:
    """Embeddings written whole or not at all: `.npy` (float32 [N, D], rows in the order given) or `.json`
    (a list of {what: key, "embedding": [...]}); PatcherError for another suffix."""
    from patcher.base.faults import write_errors
    from patcher.base.files import atomic_file, write_json

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".json"):
        raise PatcherError(f"--out {out}: write .npy (a float32 array) or .json")
    with write_errors(out):
        if suffix == ".json":
            write_json(out, embedding_records(keys, embeddings, what))
            return
        with atomic_file(out) as temporary, open(temporary, "wb") as handle:
            np.save(handle, np.ascontiguousarray(embeddings, dtype=np.float32))


def embedding_records(keys: Sequence[str], embeddings: np.ndarray, what: str) -> list[dict[str, Any]]:
    """One JSON record per row: {what: key, "embedding": [floats]}."""
    return [{what: key, "embedding": [float(v) for v in row]} for key, row in zip(keys, embeddings, strict=True)]


def read_images(paths: Sequence[Path]) -> list[bytes]:
    """The bytes of each image file; PatcherError naming a file that cannot be read."""
    return [read_image_file(Path(path)) for path in paths]
