"""Run and export directories: atomic writes, file hashes, and the manifest that later stages trust."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patcher.errors import PatcherError

RUN_FORMAT = "patcher-run/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The {"sha256", "bytes"} entry a manifest keeps for one file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary sibling and an atomic rename."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def now_iso() -> str:
    """The current UTC time in ISO-8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; rename it into place only if the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise PatcherError(f"{final} already exists: choose another --out or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, backup)
        os.replace(staging, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, final)


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


STAGING_FINGERPRINT = "options.json"


def staging_path(out: Path) -> Path:
    """The fixed hidden sibling where a long job builds `out`, so that `--resume` can find it."""
    return out.with_name(f".{out.name}.partial")


def prepare_staging(out: Path, fingerprint: dict[str, Any], resume: bool) -> Path:
    """A staging directory for `out`: the interrupted one when resuming with the same options, else a fresh one."""
    staging = staging_path(out)
    if resume:
        saved = staging / STAGING_FINGERPRINT
        if not saved.is_file():
            raise PatcherError(f"nothing to resume at {staging}: run the same command without --resume")
        if json.loads(saved.read_text()) != json.loads(json.dumps(fingerprint, default=str)):
            raise PatcherError(f"{staging} was started with other options: rerun with those or drop --resume")
        return staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json(staging / STAGING_FINGERPRINT, json.loads(json.dumps(fingerprint, default=str)))
    return staging


def finish_staging(staging: Path, out: Path) -> None:
    """Drop the resume bookkeeping and rename the finished staging directory into place."""
    (staging / STAGING_FINGERPRINT).unlink(missing_ok=True)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    if out.exists():
        raise PatcherError(f"{out} appeared while this job ran: the result stays in {staging}")
    staging.rename(out)


def append_log(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line to a training log."""
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def trim_log(path: Path, step: int) -> None:
    """Keep only the log lines up to the step training resumes from."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in lines))


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
