"""Classify image files against a Triton server over gRPC, with Triton's classification extension."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.base.registries import did_you_mean
from patcher.export.openvocab import probabilities
from patcher.triton.item_errors import item_error
from patcher.triton.repository.configs import IMAGE_BYTES

LOGITS_PREFIX = "logits_"


@dataclass(frozen=True)
class ServedModel:
    """What the client needs to know about one served model: tensors, batch limit, tasks, preprocessing."""

    name: str
    version: str
    input_name: str
    input_datatype: str
    max_batch_size: int
    tasks: dict[str, tuple[str, int]]  # task -> (output name, class count)
    preprocess: dict[str, Any] | None
    limits: dict[str, Any] | None = None  # the preprocessing model's input limits


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where a served entry answers and how to reach it: the gRPC address (HOST:PORT), the seconds a call may take,
    and the server's key file (only used to list its models when a name is not one of them; default: the file
    `patcher serve` wrote for `url`)."""

    url: str = "127.0.0.1:8001"
    timeout_s: float = 30
    key_file: Path | None = None

    def headers(self) -> dict[str, str] | None:
        """The server's key as gRPC headers, when one is found for this address."""
        from patcher.triton.serving.access import find_key

        key = find_key(self.url, self.key_file)
        return key.grpc_headers if key else None


@dataclass(frozen=True, kw_only=True)
class ClassifyOptions:
    """How many labels an answer ranks per task, and how many images go in one request (capped by the model's
    batch limit)."""

    top_k: int = 5
    batch_size: int = 16

    def check(self) -> None:
        """PatcherError for values that cannot work."""
        if self.top_k < 1 or self.batch_size < 1:
            raise PatcherError("top_k and batch_size must be at least 1")


def grpc_modules():
    """tritonclient's gRPC module and its exception, imported when a client is made."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    return grpcclient, InferenceServerException


SCHEMES = ("grpc://", "http://", "https://")


def host_port(url: str) -> str:
    """HOST:PORT of a Triton gRPC address given with or without a scheme (`http://host:8001/` -> `host:8001`)."""
    address = url.strip()
    for scheme in SCHEMES:
        if address.lower().startswith(scheme):
            address = address[len(scheme):]
    address = address.rstrip("/")
    if not address or "/" in address or any(c.isspace() for c in address):
        raise PatcherError(f"{url!r} is not a gRPC address: HOST:PORT, e.g. 127.0.0.1:8001")
    return address


def connect(url: str, timeout_s: float = 30) -> Any:
    """A gRPC client for a live server; PatcherError naming the URL if nothing answers there."""
    grpcclient, InferenceServerException = grpc_modules()
    url = host_port(url)
    try:
        client = grpcclient.InferenceServerClient(url)
        live = client.is_server_live(client_timeout=min(timeout_s, 10))
    except InferenceServerException as error:
        raise PatcherError(
            f"no Triton server answers at {url} ({error.message()}): start one with `patcher serve --repo REPO` "
            "or pass --url"
        ) from None
    except ValueError as error:  # a malformed URL
        raise PatcherError(f"bad server URL {url!r} ({error}): pass host:port, e.g. 127.0.0.1:8001") from None
    if not live:
        raise PatcherError(f"the Triton server at {url} is not live: check `patcher serve`'s log")
    return client


@contextlib.contextmanager
def connected(endpoint: Endpoint) -> Iterator[Any]:
    """A gRPC client for the live server at `endpoint` (PatcherError if nothing answers there), closed on the way
    out."""
    client = connect(endpoint.url, endpoint.timeout_s)
    try:
        yield client
    finally:
        client.close()


def _config(client: Any, model: str, timeout_s: float) -> dict[str, Any]:
    return client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def known_models(client: Any, timeout_s: float = 30, headers: dict[str, str] | None = None) -> str:
    """The server's models and their states, for error messages: the repository index with the server's key,
    else the loaded models that the (open) statistics API lists."""
    _, InferenceServerException = grpc_modules()
    try:
        index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s, headers=headers)
        return ", ".join(f"{m['name']} ({m.get('state', '?')})" for m in index.get("models", [])) or "none"
    except InferenceServerException:
        pass
    try:
        stats = client.get_inference_statistics("", as_json=True, client_timeout=timeout_s)
    except InferenceServerException:
        return "unknown"
    loaded = sorted({s["name"] for s in stats.get("model_stats", [])})
    return ", ".join(f"{name} (loaded)" for name in loaded) or "none loaded"


def describe_model(client: Any, model: str, url: str, timeout_s: float = 30,
                   headers: dict[str, str] | None = None) -> ServedModel:
    """Read a served model's config (and its preprocessing model's); PatcherError listing the server's models if it
    has no such model ready (`headers`: the server's key, to list them)."""
    _, InferenceServerException = grpc_modules()
    try:
        metadata = client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
        config = _config(client, model, timeout_s)
    except InferenceServerException as error:
        known = known_models(client, timeout_s, headers)
        names = [entry.rsplit(" (", 1)[0] for entry in known.split(", ")]
        near = did_you_mean(model, names)
        listed = f"{near} ({len(names)} models served)" if near else f"its models: {known}"
        raise PatcherError(f"the server at {url} has no ready model {model!r} ({error.message()}); {listed}") from None
    parameters = _parameters(config)
    outputs = {o["name"]: o for o in config.get("output", [])}
    declared = json.loads(parameters["tasks"]) if parameters.get("tasks") else {}
    if not declared:
        declared = {name[len(LOGITS_PREFIX) :]: name for name in outputs if name.startswith(LOGITS_PREFIX)}
    tasks = {task: (output, int(outputs[output]["dims"][-1])) for task, output in declared.items() if output in outputs}
    if parameters.get("preprocess_model"):  # the one place the preprocessing is recorded
        with contextlib.suppress(InferenceServerException):
            parameters = {**_parameters(_config(client, parameters["preprocess_model"], timeout_s)), **parameters}
    inputs = metadata["inputs"]
    return ServedModel(
        name=model,
        version=str(metadata.get("versions", ["?"])[-1]),
        input_name=inputs[0]["name"],
        input_datatype=inputs[0]["datatype"],
        max_batch_size=int(config.get("max_batch_size", 0)),
        tasks=tasks,
        preprocess=json.loads(parameters["preprocess"]) if parameters.get("preprocess") else None,
        limits=json.loads(parameters["limits"]) if parameters.get("limits") else None,
    )


def read_image_file(path: Path) -> bytes:
    """An image file's bytes; PatcherError naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise PatcherError(f"cannot read image file {path}: {error.strerror or error}") from None


def _raw_batch(
    paths: list[Path], blobs: list[bytes], spec: dict[str, Any], limits: dict[str, Any] | None
) -> np.ndarray:
    from patcher.triton.imaging import decode_image, preprocess_image

    arrays = []
    for path, blob in zip(paths, blobs, strict=True):
        try:
            arrays.append(preprocess_image(decode_image(blob, limits, spec), spec))
        except ValueError as error:
            raise PatcherError(f"{path} is not a readable image: {error}") from None
    return np.stack(arrays).astype(spec.get("dtype", "float32"), copy=False)


def parse_classification(entry: bytes | str) -> dict[str, Any]:
    """One "score:index:label" string of Triton's classification extension as {"label", "index", "score"}."""
    text = entry.decode() if isinstance(entry, bytes) else str(entry)
    score, index, label = [*text.split(":", 2), "", ""][:3]
    return {"label": label or index, "index": int(index), "score": float(score)}


def classify_files(paths: list[Path], model: str, *, endpoint: Endpoint = Endpoint(),
                   options: ClassifyOptions = ClassifyOptions(), raw: bool = False) -> list[dict]:
    """Top-k (label, score) per task for each image file, from the ensemble `model` (or `<model>_patched` if raw).

    raw=True preprocesses here (as the served model's config records it) and sends float tensors. The server's key
    (`endpoint.key_file`, else the file `patcher serve` wrote for its URL) only serves to list its models when
    `model` is not one of them.
    """
    grpcclient, InferenceServerException = grpc_modules()
    url, timeout_s = endpoint.url, endpoint.timeout_s
    headers = endpoint.headers()
    paths = [Path(p) for p in paths]
    options.check()
    with connected(endpoint) as client:
        target = model if not raw or model.endswith("_patched") else f"{model}_patched"
        served = describe_model(client, target, url, timeout_s, headers)
        _check_classifies(served, target, url, raw)
        step = min(options.batch_size, served.max_batch_size) if served.max_batch_size > 0 else 1
        results: list[dict] = []
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            blobs = [read_image_file(path) for path in chunk]
            if raw:
                array = _raw_batch(chunk, blobs, served.preprocess or {}, served.limits)
                tensor = grpcclient.InferInput(served.input_name, list(array.shape), served.input_datatype)
            else:
                array = np.array(blobs, dtype=np.object_).reshape(-1, 1)
                tensor = grpcclient.InferInput(IMAGE_BYTES, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            # every class, ranked: the probabilities are a softmax over all of a task's logits
            requested = [grpcclient.InferRequestedOutput(output, class_count=classes)
                         for output, classes in served.tasks.values()]
            try:
                response = client.infer(target, [tensor], outputs=requested, client_timeout=timeout_s)
            except InferenceServerException as error:
                raise infer_error(error, chunk, target, url) from None
            per_task = {task: response.as_numpy(output) for task, (output, _) in served.tasks.items()}
            results += [_file_result(path, target, served.version,
                                     {task: values[row] for task, values in per_task.items()}, options.top_k)
                        for row, path in enumerate(chunk)]
        return results


def _check_classifies(served: ServedModel, target: str, url: str, raw: bool) -> None:
    """PatcherError when the served model cannot answer classify_files' request (raw tensors or image bytes)."""
    if raw and served.preprocess is None:
        raise PatcherError(f"{target} on {url} records no preprocessing: send image bytes to the ensemble instead")
    if not served.tasks:
        raise PatcherError(f"{target} on {url} has no logits outputs: pass the ensemble or a _patched model")
    if not raw and served.input_datatype != "BYTES":
        raise PatcherError(f"{target} takes {served.input_datatype} tensors, not image bytes: pass raw=True")


def _file_result(path: Path, target: str, version: str, per_task: dict[str, Any], top_k: int) -> dict:
    """One file's answer: the model and version that gave it, each task's top-k classifications."""
    return {
        "file": str(path),
        "model": target,
        "version": version,
        "tasks": {task: with_probabilities([parse_classification(e) for e in np.asarray(values).reshape(-1)])[:top_k]
                  for task, values in per_task.items()},
    }


def with_probabilities(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A task's whole ranking with each entry's probability added: the softmax of its logit over all the classes."""
    scores = np.array([[entry["score"] for entry in ranked]], dtype=np.float64)
    return [{**entry, "probability": float(p)} for entry, p in zip(ranked, probabilities(scores)[0], strict=True)]


def infer_error(error: Any, chunk: list[Path], model: str, url: str) -> PatcherError:
    """A PatcherError for a failed request, naming the file when the server says which item did not decode."""
    message = error.message() or str(error)
    item = item_error(message)
    named = item.named([str(path) for path in chunk], "is not a readable image") if item else None
    if named is not None:
        return PatcherError(named.split("\n")[0])
    if "Deadline" in message or "deadline" in message:
        return PatcherError(f"{model} on {url} did not answer in time ({message}): raise --timeout")
    return PatcherError(f"{model} on {url} refused the request: {message}")
