"""`patcher deploy REPO --kubernetes DIR`: every manifest written into DIR whole or not at all, and what to do next.

Python-backend models (image decoding, the tokenizer, the bundled flavour's onnxruntime classifiers) need packages
NVIDIA's image lacks: then DIR/Dockerfile builds on that image, and every manifest runs the image it builds (named by
--serving-image, default `<name>:<tag>`), so nothing runs the stock image by mistake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from patcher.base.errors import PatcherError
from patcher.base.staging import staged_output
from patcher.deploy.kserve import kserve_manifests
from patcher.deploy.kubernetes import kubernetes_manifests
from patcher.deploy.settings import DeployOptions, Source, read_source

DOCKERFILE = """\
# The image the manifests beside this file run ({built}): NVIDIA's Triton with what patcher's python-backend
# models import (the preprocessing model decodes images with Pillow{onnxruntime_note}).
#   docker build -t {built} {folder} && docker push {built}
FROM {image}:{tag}
RUN pip install --no-cache-dir pillow numpy{onnxruntime}
"""


def manifests(repo: str, options: DeployOptions) -> tuple[dict[str, dict[str, Any]], Source]:
    """file name -> manifest for a repository (s3:// or a folder whose copy a claim holds), and its source."""
    options.check()
    source = read_source(repo, options)
    return {**kubernetes_manifests(options, source), **kserve_manifests(options, source)}, source


def write_manifests(repo: str, out: Path, options: DeployOptions, overwrite: bool = False) -> list[Path]:
    """Write the manifests (and the Dockerfile of the image they run, when one is needed) into `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PatcherError(f"{out} already exists: pass --overwrite to replace it, or another --kubernetes folder")
    documents, source = manifests(repo, options)
    with staged_output(out, overwrite=overwrite) as staging:
        folder = staging.open()
        for name, document in documents.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(yaml.safe_dump(document, sort_keys=False, width=120))
        if source.python_models:
            (folder / "Dockerfile").write_text(dockerfile(options, source, out))
    return sorted(out / name for name in [*documents, *(["Dockerfile"] if source.python_models else [])])


def dockerfile(options: DeployOptions, source: Source, out: Path) -> str:
    """The Dockerfile of the image the manifests run."""
    bundled = source.onnxruntime_in_python
    return DOCKERFILE.format(image=options.image, tag=options.tag, built=options.built_image, folder=out,
                             onnxruntime=" onnxruntime" if bundled else "",
                             onnxruntime_note="; the bundled flavour's classifiers run onnxruntime" if bundled else "")


def next_steps(repo: str, out: Path, options: DeployOptions) -> list[str]:
    """The commands that take the written folder to a running service, in order."""
    source = read_source(repo, options)
    steps = []
    if source.python_models:
        image = options.built_image
        if "/" in image.partition(":")[0]:
            steps.append(f"docker build -t {image} {out} && docker push {image}")
        else:
            steps.append(f"docker build -t {image} {out}, then make it pullable: `kind load docker-image {image}`, "
                         f"or rerun with --serving-image REGISTRY/{image} and push it there")
    steps.append(f"kubectl -n {options.namespace} create secret generic {options.key_secret} "
                 "--from-literal=key=\"$(openssl rand -hex 32)\"")
    if source.s3:
        steps.append(f"kubectl -n {options.namespace} create secret generic {options.s3_secret} "
                     "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...")
    steps.append(f"kubectl apply -f {out}   (or, on KServe: kubectl apply -f {out / 'kserve'})")
    steps.append(f"kubectl -n {options.namespace} port-forward svc/{options.name} 8001 &  "
                 "then: patcher verify RUN --url 127.0.0.1:8001")
    return steps
