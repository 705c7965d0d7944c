"""patcher as a library: the main jobs as a few functions, for notebooks, scripts and services.

    from patcher import api

    run = api.build("folder:/data/shapes", support=["fashion-mnist"], model="ViT-B-32", steps=500)
    api.export(run)                                        # RUN/onnx, parity-checked
    model = api.load(run)                                  # the patched model in this process (onnxruntime)
    model.classify(["circle.png"])                         # [{"shapes": [{"label": ..., "score": ...}, ...]}]
    model.classify(["circle.png"], labels=["a ring", "a plus"], templates=["a drawing of {}."])
    model.embed(["circle.png"]), model.embed_text(["a ring"])   # [N, D] L2-normalised float32
    served = api.Client("127.0.0.1:8001", "shapes")        # an entry `patcher serve` serves
    served.classify(["circle.png"]), served.embed(["circle.png"]), served.embed_text(["a ring"])

Every failure a user can cause is a `PatcherError` (one line: what is wrong and what to do). Images are file paths,
encoded bytes or PIL images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patcher.base.errors import PatcherError

if TYPE_CHECKING:
    from patcher.triton.client import Endpoint

Image = str | Path | bytes | Any  # a file path, encoded bytes, or a PIL image


def build(task: str, *, support: Sequence[str] = (), task_name: str | None = None, **options: Any) -> Path:
    """Fine-tune on `task`, interpolate with the zero-shot weights, choose alpha; the run directory.

    `options`: BuildOptions' fields (model, pretrained, out, alpha, tolerance, method, data_dir, ...) and training
    hyperparameters (steps, batch_size, lr, weight_decay, warmup_steps, seed, ...), as `patcher build` takes them.
    """
    from patcher.data.tasks.user_data import CSV_DEFAULTS, named_spec
    from patcher.stages.build import BuildOptions
    from patcher.stages.build import build as run_build
    from patcher.training.config import TrainConfig
    from patcher.training.methods import train_config

    training = {field.name for field in dataclasses.fields(TrainConfig)}
    hyperparameters = {key: options.pop(key) for key in list(options) if key in training}
    unknown = sorted(set(options) - {field.name for field in dataclasses.fields(BuildOptions)})
    if unknown:
        raise PatcherError(f"build() has no option {', '.join(unknown)}: pass BuildOptions' or TrainConfig's fields")
    method = options.get("method", "ft")
    path = run_build(BuildOptions(task=named_spec(task, task_name, dict(CSV_DEFAULTS)), support=list(support),
                                  train_config=train_config(method, **hyperparameters), **options))
    if path is None:
        raise PatcherError("this process is not the main rank of a distributed build: rank 0 returns the run")
    return Path(path)


def export(run: str | Path, **options: Any) -> Path:
    """Export a run's patched and zero-shot models to ONNX (ExportOptions' fields: out, int8, fp16, text, ...)."""
    from patcher.stages.export import ExportOptions, export_run

    return Path(export_run(Path(run), ExportOptions(**options)))


class Model:
    """A run's exported patched model in this process (onnxruntime, no server, no torch)."""

    def __init__(self, path: str | Path, kind: str = "patched") -> None:
        from patcher.triton.onnxruntime_local import LocalModel

        self.local = LocalModel(Path(path), kind)

    @property
    def tasks(self) -> dict[str, list[str]]:
        """The run's tasks and their class names, in logit order."""
        return {task: list(info.classnames) for task, info in self.local.record.tasks.items()}

    def classify(self, images: Sequence[Image], labels: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, top_k: int = 3) -> list[dict[str, list[dict]]]:
        """Per image, the top-k {"label", "index", "score", "probability"} of every task (or, with `labels`, of that
        label set: key "labels"); scores are logits, as the served models give them, probabilities their softmax."""
        from patcher.triton.onnxruntime_local import label_set

        blobs, names = encoded(images)
        if labels is None:
            return self.local.classify_tasks(blobs, names, top_k)
        chosen = label_set(list(labels), None if templates is None else list(templates))
        return [{"labels": ranked} for ranked in self.local.classify_labels(blobs, names, chosen, top_k)]

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        """[N, D] L2-normalised image embeddings."""
        blobs, names = encoded(images)
        return self.local.embed_images(blobs, names)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised text embeddings (the export's text tower)."""
        return self.local.embed_texts(list(texts))


def load(path: str | Path, kind: str = "patched") -> Model:
    """A run directory (its onnx/ export) or an export directory, loaded in this process; kind patched or zeroshot."""
    return Model(path, kind)


@dataclasses.dataclass
class Client:
    """An entry served by `patcher serve` (or NVIDIA's Triton): classify and embed over gRPC."""

    url: str = "127.0.0.1:8001"
    model: str = ""  # the entry, e.g. the patch task
    key_file: Path | None = None  # the server's key file (only to list its models on a typo)
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        from patcher.triton.client import host_port

        self.url = host_port(self.url)

    @property
    def endpoint(self) -> Endpoint:
        """The address, timeout and key file as the client functions take them."""
        from patcher.triton.client import Endpoint

        return Endpoint(url=self.url, timeout_s=self.timeout_s, key_file=self.key_file)

    def classify(self, images: Sequence[Image], labels: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, top_k: int = 3) -> list[dict[str, list[dict]]]:
        """Per image, the top-k {"label", "index", "score", "probability"} of every served task (or of the label set
        `labels`); probabilities are the softmax of all of a task's logits."""
        from patcher.triton.client import ClassifyOptions, classify_files
        from patcher.triton.openvocab_client import classify_labels

        options = ClassifyOptions(top_k=top_k)
        with as_files(images) as paths:
            if labels is None:
                results = classify_files(paths, self.model, endpoint=self.endpoint, options=options)
            else:
                results = classify_labels(paths, self.model, list(labels), templates, endpoint=self.endpoint,
                                          options=options)
        return [result["tasks"] for result in results]

    def embed(self, images: Sequence[Image]) -> np.ndarray:
        """[N, D] L2-normalised image embeddings from the served entry."""
        from patcher.triton.openvocab_client import embed_files

        with as_files(images) as paths:
            return embed_files(paths, self.model, endpoint=self.endpoint)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised text embeddings from the entry's text model."""
        from patcher.triton.openvocab_client import embed_texts

        return embed_texts(list(texts), self.model, endpoint=self.endpoint)


@contextlib.contextmanager
def as_files(images: Sequence[Image]) -> Iterator[list[Path]]:
    """The images as file paths: paths as they are, bytes and PIL images written to a temporary folder meanwhile."""
    if all(isinstance(image, str | Path) for image in images):
        yield [Path(image) for image in images]
        return
    blobs, _ = encoded(images)
    with tempfile.TemporaryDirectory(prefix="patcher-client-") as folder:
        paths = []
        for number, (image, blob) in enumerate(zip(images, blobs, strict=True)):
            if isinstance(image, str | Path):
                paths.append(Path(image))
                continue
            paths.append(Path(folder) / f"image-{number}")
            paths[-1].write_bytes(blob)
        yield paths


def encoded(images: Sequence[Image]) -> tuple[list[bytes], list[str]]:
    """Encoded bytes and a name for each image (a path's file read, a PIL image saved as PNG)."""
    blobs, names = [], []
    for number, image in enumerate(images):
        if isinstance(image, bytes):
            blobs.append(image)
            names.append(f"image {number}")
        elif isinstance(image, str | Path):
            try:
                blobs.append(Path(image).read_bytes())
            except OSError as error:
                raise PatcherError(f"cannot read image file {image}: {error.strerror or error}") from None
            names.append(str(image))
        elif hasattr(image, "save"):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
            names.append(f"image {number}")
        else:
            raise PatcherError(f"image {number} is a {type(image).__name__}: pass a file path, bytes or a PIL image")
    return blobs, names


__all__ = ["Client", "Model", "build", "export", "load"]
