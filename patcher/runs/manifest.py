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
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != STAGING_FINGERPRINT
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
    return Run(path=path, manifest=read_format_json(manifest_path, RUN_FORMAT, "rebuild the run"))


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
