"""`patcher deploy REPO --kubernetes DIR`: every manifest written into DIR whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from patcher.base.staging import staged_output
from patcher.deploy.kserve import kserve_manifests
from patcher.deploy.kubernetes import kubernetes_manifests
from patcher.deploy.options import DeployOptions, Source, read_source

DOCKERFILE = """\
# NVIDIA's Triton image with what patcher's python-backend models import (the preprocessing model decodes
# images with Pillow; the bundled flavour's classifiers run onnxruntime). Build, push, and pass --image/--tag.
FROM {image}:{tag}
RUN pip install --no-cache-dir pillow numpy{onnxruntime}
"""


def manifests(repo: str, options: DeployOptions) -> tuple[dict[str, dict[str, Any]], Source]:
    """file name -> manifest for a repository (s3:// or a folder whose copy a claim holds), and its source."""
    options.check()
    source = read_source(repo, options)
    return {**kubernetes_manifests(options, source), **kserve_manifests(options, source)}, source


def write_manifests(repo: str, out: Path, options: DeployOptions, overwrite: bool = False) -> list[Path]:
    """Write the manifests (and a Dockerfile for the python-backend models) into `out`; the files written."""
    documents, source = manifests(repo, options)
    out = Path(out)
    with staged_output(out, overwrite=overwrite) as staging:
        folder = staging.open()
        for name, document in documents.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(yaml.safe_dump(document, sort_keys=False, width=120))
        onnxruntime = " onnxruntime" if source.onnxruntime_in_python else ""
        (folder / "Dockerfile").write_text(DOCKERFILE.format(image=options.image, tag=options.tag,
                                                             onnxruntime=onnxruntime))
    return sorted(out / name for name in [*documents, "Dockerfile"])
