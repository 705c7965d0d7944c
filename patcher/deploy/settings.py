"""What `patcher deploy` takes, checked once; the repository's models and where the pods read them from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from patcher.base.errors import PatcherError
from patcher.deploy.triton_image import TRITON_IMAGE, TRITON_TAG
from patcher.triton.repository.configs import CONFIG_FILE
from patcher.triton.repository.objectstore import pinned_versions
from patcher.triton.repository.s3 import parse_location
from patcher.triton.repository.stores import Store, is_object_store, open_store

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Docker's reference grammar (distribution/reference): [host[:port]/]path, path components lower-case
IMAGE = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
AUTOSCALE = ("pending-requests", "cpu")
PVC_MOUNT = "/models"


@dataclass(frozen=True, kw_only=True)
class DeployOptions:
    """A deployment of one repository: names, image, resources, scaling, secrets, and the KServe canary share."""

    name: str = "patcher-triton"
    namespace: str = "default"
    image: str = TRITON_IMAGE
    tag: str = TRITON_TAG
    gpus: int = 1
    cpu: str = "2"
    memory: str = "8Gi"
    replicas: int = 2
    max_replicas: int = 6
    autoscale: str = "pending-requests"
    autoscale_target: float = 8.0  # pending requests per pod, or CPU percent
    key_secret: str = "patcher-triton-key"
    s3_secret: str = "patcher-s3"
    region: str | None = None
    pvc: str | None = None  # the repository is this claim's content, mounted at /models
    cache_pvc: str | None = None  # a claim for TensorRT engine caches (else an emptyDir)
    canary_percent: int = 10
    serving_image: str | None = None  # what the pods run: the Dockerfile's build (default `<name>:<tag>`)

    @property
    def built_image(self) -> str:
        """The image the written Dockerfile builds and the pods run."""
        return self.serving_image or f"{self.name}:{self.tag}"

    def check(self) -> None:
        """PatcherError naming the first option Kubernetes would refuse."""
        for label, value in (("--name", self.name), ("--namespace", self.namespace), ("--key-secret", self.key_secret),
                             ("--s3-secret", self.s3_secret), ("--pvc", self.pvc or "x"),
                             ("--cache-pvc", self.cache_pvc or "x")):
            if len(value) > 63 or not DNS_LABEL.fullmatch(value):
                raise PatcherError(f"{label} {value!r} is not a Kubernetes name: lower-case letters, digits and '-', "
                                   "at most 63 characters")
        if not IMAGE.fullmatch(self.image):
            raise PatcherError(f"--image {self.image!r} is not an image name: [HOST[:PORT]/]PATH without a tag, e.g. "
                               "nvcr.io/nvidia/tritonserver")
        if not TAG.fullmatch(self.tag):
            raise PatcherError(f"--tag {self.tag!r} is not an image tag: letters, digits, '_', '.', '-' (at most 128), "
                               "e.g. 24.10-py3")
        if self.serving_image is not None and not is_reference(self.serving_image):
            raise PatcherError(f"--serving-image {self.serving_image!r} is not an image reference: "
                               "[HOST[:PORT]/]PATH[:TAG], e.g. registry.example.com/ml/patcher-triton:24.10-py3")
        if self.gpus < 0 or self.replicas < 1 or self.max_replicas < self.replicas:
            raise PatcherError("--gpus must be 0 or more, --replicas at least 1 and --max-replicas at least --replicas")
        if self.autoscale not in AUTOSCALE:
            raise PatcherError(f"--autoscale {self.autoscale!r}: use one of {', '.join(AUTOSCALE)}")
        if not 0 <= self.canary_percent <= 100 or self.autoscale_target <= 0:
            raise PatcherError("--canary-percent must lie in 0..100 and --autoscale-target be positive")


def is_reference(text: str) -> bool:
    """Whether `text` is an image reference Docker accepts: [HOST[:PORT]/]PATH[:TAG]."""
    path, colon, tag = text.rpartition(":")
    if colon and "/" not in tag:
        return bool(IMAGE.fullmatch(path) and TAG.fullmatch(tag))
    return bool(IMAGE.fullmatch(text))


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where the pods read the repository, and what they load from it."""

    repository: str  # tritonserver's --model-repository
    storage_uri: str  # KServe's storageUri
    s3: bool
    endpoint: str | None
    models: list[str]
    caches: list[str] = field(default_factory=list)  # TensorRT cache folders the configs name
    onnxruntime_in_python: bool = False  # classifiers of the bundled flavour (python backend running onnxruntime)
    python_models: bool = False  # python-backend models (image decoding, tokenizer): they need the built image


def read_source(repo: str, options: DeployOptions) -> Source:
    """The repository's models (composing models first) and where pods find it: its s3:// location, or the claim
    given by --pvc for a folder (whose content the claim holds)."""
    store: Store = open_store(repo)
    models = store.models()
    if not models:
        raise PatcherError(f"{store.location} holds no models: write one with `patcher triton RUN --repo {repo}`")
    configs = {model: store.read(f"{model}/{CONFIG_FILE}") or "" for model in models}
    ordered = sorted(models, key=lambda m: 'platform: "ensemble"' in configs[m])
    caches = sorted({m.group(1) for text in configs.values()
                     for m in re.finditer(r'key: "trt_engine_cache_path"\s*value: "([^"]+)"', text)})
    python = any('backend: "python"' in text and 'key: "preprocess_model"' in text for text in configs.values())
    any_python = any('backend: "python"' in text for text in configs.values())
    if is_object_store(repo):
        location = parse_location(repo)
        if options.pvc:
            raise PatcherError("--pvc is for a repository folder copied onto a claim; this one is in object storage")
        unpinned = [m for m in models if not pinned_versions(configs[m])]
        if unpinned:
            raise PatcherError(f"{unpinned[0]} in {repo} does not pin its version: write it with `patcher triton`")
        path = f"{location.bucket}/{location.prefix}".rstrip("/")
        return Source(repository=location.uri, storage_uri=f"s3://{path}", s3=True, endpoint=location.endpoint,
                      models=ordered, caches=caches, onnxruntime_in_python=python, python_models=any_python)
    if not options.pvc:
        raise PatcherError(f"{repo} is a local folder: pods cannot read it. Publish it to object storage "
                           "(`patcher triton RUN --repo s3://BUCKET/PREFIX`) or copy it onto a claim and pass --pvc")
    return Source(repository=PVC_MOUNT, storage_uri=f"pvc://{options.pvc}", s3=False, endpoint=None, models=ordered,
                  caches=caches, onnxruntime_in_python=python, python_models=any_python)
