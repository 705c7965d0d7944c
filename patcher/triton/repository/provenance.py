"""What each served model came from, in its config's parameters, so that a client can tell which run and which
weights a server answers with (`patcher verify`): the run's manifest hash, and each classifier's ONNX hash."""

from __future__ import annotations

from pathlib import Path

from patcher.base.files import sha256_file
from patcher.triton.repository.entry_context import ModelPlan
from patcher.triton.repository.export_info import ExportInfo

RUN_MANIFEST = "run_manifest_sha256"
ONNX = "onnx_sha256"  # the exported file a classifier serves (the pixels model: the file its graph wraps)


def stamp(plans: list[ModelPlan], info: ExportInfo, files: dict[str, Path]) -> None:
    """Record the run's manifest hash in every model's config, and the ONNX hash in each classifier's."""
    manifest = info.record.run.manifest_sha256
    hashes = {kind: sha256_file(path) for kind, path in files.items()}
    for plan in plans:
        plan.config.parameters[RUN_MANIFEST].string_value = manifest
        kind = "patched" if plan.model.kind == "pixels" else plan.model.kind
        if kind in hashes:
            plan.config.parameters[ONNX].string_value = hashes[kind]
