"""The run manifest: the record every later stage trusts, read back as a `Run` whose files are checked by hash."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patcher import __version__
from patcher.errors import PatcherError
from patcher.runs.store import STAGING_FINGERPRINT, file_record, sha256_file

RUN_FORMAT = "patcher-run/1"
MANIFEST = "manifest.json"
TIMINGS = "timings.json"  # when and how long: beside the manifest, not in it, so that it stays byte-reproducible
TIMINGS_FORMAT = "patcher-timings/1"


def now_iso() -> str:
    """The current UTC time in ISO-8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a result depends on."""
    import importlib.metadata as metadata

    versions = {"python": sys.version.split()[0]}
    for package in ("patcher", "torch", "open_clip_torch", "numpy", "onnx", "onnxruntime", "tritonclient"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def versions() -> dict[str, str]:
    """Library versions and patcher's."""
    return {**library_versions(), "patcher": __version__}


def files_record(staging: Path) -> dict[str, Any]:
    """sha256 and size of every file in the staging directory (the manifest's `files`)."""
    left_out = (STAGING_FINGERPRINT, TIMINGS, MANIFEST)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name not in left_out
                   and "checkpoints" not in p.relative_to(staging).parts)
    return {str(p.relative_to(staging)): file_record(p) for p in files}


def options_sha256(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the options that determine a result."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Run:
    """A finished run directory whose manifest has been read."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        """The run's name, as recorded when it was built."""
        return str(self.manifest["name"])

    @property
    def tasks(self) -> list[str]:
        """Every task whose head the run carries, patch tasks first."""
        return list(self.manifest["tasks"])

    @property
    def timings(self) -> dict[str, Any]:
        """timings.json's content (created, timings_s), empty for a run that has none."""
        try:
            return json.loads((self.path / TIMINGS).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @property
    def manifest_sha256(self) -> str:
        """sha256 of manifest.json, which names everything else by hash."""
        return sha256_file(self.path / MANIFEST)

    def verified_file(self, relative: str) -> Path:
        """Path of a file the manifest lists, after checking its sha256 against the manifest."""
        record = self.manifest.get("files", {}).get(relative)
        path = self.path / relative
        if record is None:
            raise PatcherError(f"{self.path} has no {relative} in its manifest: rebuild the run")
        if not path.is_file():
            raise PatcherError(f"{path} is missing: the run is incomplete, rebuild it")
        if sha256_file(path) != record["sha256"]:
            raise PatcherError(f"{path} does not match the sha256 in its manifest: the file is corrupt or edited")
        return path


def load_run(path: Path | str) -> Run:
    """Read a run directory's manifest, refusing anything that is not a complete patcher run."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PatcherError(f"{path} is not a directory: pass a run directory written by `patcher build`")
    if not manifest_path.is_file():
        raise PatcherError(f"{path} is not a patcher run (no {MANIFEST}): pass a directory from `patcher build`")
    manifest = read_format_json(manifest_path, RUN_FORMAT, "rebuild the run")
    check_manifest(manifest, manifest_path)
    return Run(path=path, manifest=manifest)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) and item for item in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def manifest_problems(manifest: Mapping[str, Any]) -> list[str]:
    """What is missing or malformed in the fields later stages read (empty when the manifest is usable)."""
    problems = []
    if not isinstance(manifest.get("name"), str) or not manifest.get("name"):
        problems.append("no run name")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        problems.append("no tasks")
    else:
        for task, record in tasks.items():
            if not isinstance(record, dict) or not _is_str_list(record.get("classnames")):
                problems.append(f"task {task!r} has no class names")
            elif not _is_str_list(record.get("templates", ["{}"])):
                problems.append(f"task {task!r} has malformed templates")
    for key in ("patch_tasks", "support_tasks"):
        names = manifest.get(key, [])
        if not isinstance(names, list) or not all(isinstance(tasks, dict) and name in tasks for name in names):
            problems.append(f"{key} names tasks the manifest does not describe")
    model = manifest.get("model")
    preprocess = model.get("preprocess") if isinstance(model, dict) else None
    size = preprocess.get("image_size") if isinstance(preprocess, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 0 < v <= 8192 for v in size)):
        problems.append(f"model.preprocess.image_size {size!r} is not [height, width] in pixels")
    if isinstance(model, dict) and not (isinstance(model.get("embed_dim"), int) and model["embed_dim"] > 0):
        problems.append(f"model.embed_dim {model.get('embed_dim')!r} is not a positive integer")
    alpha = manifest.get("alpha")
    chosen = alpha.get("chosen") if isinstance(alpha, dict) else None
    if not (_is_number(chosen) and 0.0 <= chosen <= 1.0):
        problems.append(f"alpha.chosen {chosen!r} is not a number in [0, 1]")
    if not isinstance(manifest.get("files"), dict):
        problems.append("no files section")
    return problems


def check_manifest(manifest: Mapping[str, Any], path: Path) -> None:
    """PatcherError naming what is wrong when the manifest lacks or garbles what later stages read."""
    problems = manifest_problems(manifest)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise PatcherError(f"{path} is damaged or was edited by hand: {shown}: rebuild the run "
                           "(or restore the manifest the build wrote)")


def read_format_json(path: Path, expected_format: str, remedy: str) -> dict[str, Any]:
    """A JSON record whose "format" must be `expected_format`; PatcherError (ending with `remedy`) otherwise."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PatcherError(f"{path} is not valid JSON ({error.msg}): {remedy}") from error
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else None
        raise PatcherError(f"{path} has format {found!r}, expected {expected_format!r}: {remedy}")
    return data
