"""A model repository in an object store: the same all-or-nothing update as a folder, without renames.

An object appears the moment it is written, so no version may be named before all of it is there. A publish:

    .patcher-upload.json                    1. the intent: which version of which models this writer uploads
    <model>/<version>/...                   2. every version object, uploaded and verified (size and hash); no config
                                               names the version yet (configs pin theirs: version_policy specific)
    .patcher-staging-<txn>/<model>/...      3. each model's new config.pbtxt (pinning the new version) and labels,
                                               uploaded and verified
    .patcher-journal.json "publishing"      4. names the staged objects and their hashes (roll forward from here)
    <model>/config.pbtxt, labels, warmup/   5. server-side copies, config.pbtxt last: it now loads the new version
    .patcher-journal.json "committed"       6. `patcher serve` loads the changed models
                                            7. staging and intent deleted

A writer killed before 4 leaves objects no config names (the next writer deletes them, from the intent); killed
after 4, the next writer finishes the copies. Writers exclude each other with `.patcher-writer.lock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.files import now_iso
from patcher.triton.repository.configs import CONFIG_FILE
from patcher.triton.repository.publish import JOURNAL, STAGING_PREFIX, Journal, Staged, journal_from, staged_hashes
from patcher.triton.repository.s3 import Bucket, Digest, Location, parse_location

INTENT = ".patcher-upload.json"
WRITER_LOCK = ".patcher-writer.lock"


def pin_version(text: str, version: int) -> str:
    """A config.pbtxt text with `version_policy { specific { versions: version } }`."""
    config = text_format.Parse(text, mc.ModelConfig())
    config.version_policy.Clear()
    config.version_policy.specific.versions.append(version)
    return text_format.MessageToString(config)


def pinned_versions(text: str | None) -> list[int] | None:
    """The versions a config.pbtxt pins, None when it pins none (or there is no config)."""
    if text is None:
        return None
    try:
        config = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError:
        return None
    return sorted(config.version_policy.specific.versions) if config.version_policy.HasField("specific") else None


class ObjectStore:
    """A repository at an s3:// location (see the module docstring for the publish protocol)."""

    pins_versions = True

    def __init__(self, location: Location) -> None:
        self.bucket = Bucket(location)
        self.location = location.uri

    @classmethod
    def from_uri(cls, uri: str) -> ObjectStore:
        """The store at an s3:// location (PatcherError for other schemes and unreadable names)."""
        return cls(parse_location(uri))

    # Writing -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """The bucket must exist; the writer lock object is held for the block."""
        self.bucket.check()
        with self.bucket.lock(WRITER_LOCK):
            yield

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A local temporary folder (uploaded by `publish`)."""
        folder = Path(tempfile.mkdtemp(prefix="patcher-upload-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staging: Path, staged: list[Staged], entry: str, version: int | None) -> Journal:
        """Upload and verify the versions, stage the configs, then journal, copy and commit (module docstring)."""
        for item in staged:
            config = item.model_dir / CONFIG_FILE
            pinned = item.version if item.version is not None else self._current(item.model)
            if pinned is not None:
                config.write_text(pin_version(config.read_text(), pinned))
        if not self._changed(staged):  # the same export again: no transaction, no reload anywhere
            return self.journal()
        txn = uuid.uuid4().hex[:12]
        folder = f"{STAGING_PREFIX}{txn}/"
        models = {item.model: item.version for item in staged}
        self.bucket.put(INTENT, _json({"txn": txn, "staging": folder, "models": models, "time": now_iso()}))
        for item in staged:
            if item.version is not None:
                for path in _files(item.version_dir):
                    self.bucket.put(f"{item.model}/{item.version}/{_relative(path, item.version_dir)}", path)
        files: dict[str, dict[str, Any]] = {}
        for item in staged:
            for path in _files(item.model_dir):
                relative = f"{item.model}/{_relative(path, item.model_dir)}"
                files[relative] = vars(self.bucket.put(folder + relative, path))
        previous = self.journal()
        journal = Journal(serial=previous.serial + 1, state="publishing", entry=entry, version=version, models=models,
                          staging=folder.rstrip("/"), hashes={**previous.hashes, **staged_hashes(staged)})
        self._write_journal(journal, txn, files)
        return self._finish(journal, txn, files)

    def _changed(self, staged: list[Staged]) -> bool:
        """True when publishing would change anything: a new version, or a model-level file that differs."""
        return any(item.version is not None or any(
            self.bucket.get(f"{item.model}/{_relative(path, item.model_dir)}") != path.read_bytes()
            for path in _files(item.model_dir)) for item in staged)

    def _finish(self, journal: Journal, txn: str, files: dict[str, dict[str, Any]]) -> Journal:
        """Copy the staged model-level objects into place (each config last), commit, clean up."""
        folder = f"{journal.staging}/"
        ordered = sorted(files, key=lambda relative: (relative.split("/")[0], relative.endswith(f"/{CONFIG_FILE}")))
        for relative in ordered:
            self.bucket.copy(folder + relative, relative, Digest(**files[relative]))
        committed = dataclasses.replace(journal, state="committed")
        self._write_journal(committed, txn, {})
        self.bucket.delete_folder(folder)
        self.bucket.delete([INTENT])
        return committed

    def _write_journal(self, journal: Journal, txn: str, files: dict[str, dict[str, Any]]) -> None:
        self.bucket.put(JOURNAL, _json({**journal.record(), "txn": txn, "files": files}))

    def _current(self, model: str) -> int | None:
        """The version a model's config pins now, else its newest version."""
        pinned = pinned_versions(self.read(f"{model}/{CONFIG_FILE}"))
        if pinned:
            return pinned[-1]
        versions = self._listed_versions(model)
        return versions[-1] if versions else None

    def recover(self) -> list[str]:
        """Finish a publish the journal says was under way; delete what an upload that never got that far left."""
        done = []
        record = self.bucket.get_json(JOURNAL) or {}
        journal = _journal(record)
        if journal.publishing:
            files = dict(record.get("files") or {})
            for relative, digest in files.items():
                self.bucket.verify(f"{journal.staging}/{relative}", Digest(**digest))
            self._finish(journal, str(record.get("txn")), files)
            done.append(f"finished publishing version {journal.version} of {journal.entry} (interrupted earlier)")
        intent = self.bucket.get_json(INTENT)
        if intent is not None:
            for model, version in dict(intent.get("models") or {}).items():
                named = pinned_versions(self.read(f"{model}/{CONFIG_FILE}")) or []
                if version is not None and version not in named and self.bucket.delete_folder(f"{model}/{version}/"):
                    done.append(f"removed {model}/{version}/ (uploaded by an interrupted run, never named)")
            self.bucket.delete([INTENT])
        leftovers = sorted({key.split("/")[0] for key in self.bucket.listing(STAGING_PREFIX)})
        for folder in leftovers:
            self.bucket.delete_folder(f"{folder}/")
            done.append(f"removed {folder}/ (left by an interrupted run)")
        return done

    # Reading ---------------------------------------------------------------------------------------------------
    def journal(self) -> Journal:
        """The journal object (an empty committed journal when there is none)."""
        return _journal(self.bucket.get_json(JOURNAL) or {})

    def models(self) -> list[str]:
        """Top-level folders holding a config.pbtxt (hidden ones excluded)."""
        keys = self.bucket.listing()
        return sorted({key.split("/")[0] for key in keys if key.count("/") == 1 and key.endswith(f"/{CONFIG_FILE}")
                       and not key.startswith(".")})

    def _listed_versions(self, model: str) -> list[int]:
        parts = {key.split("/")[1] for key in self.bucket.listing(f"{model}/") if key.count("/") >= 2}
        return sorted(int(part) for part in parts if part.isdigit())

    def versions(self, model: str) -> list[int]:
        """The model's versions up to the one its config pins (a newer one is still being uploaded)."""
        listed = self._listed_versions(model)
        pinned = pinned_versions(self.read(f"{model}/{CONFIG_FILE}"))
        return [v for v in listed if v <= max(pinned)] if pinned else listed

    def read(self, relative: str) -> str | None:
        """An object's text, None when there is none."""
        data = self.bucket.get(relative)
        return None if data is None else data.decode(errors="replace")

    def signature(self, model: str) -> tuple[Any, ...]:
        """The model-level objects (config.pbtxt pins the version, labels, warmup) and their ETags."""
        keys = self.bucket.listing(f"{model}/")
        return tuple(sorted((key, item["etag"]) for key, item in keys.items()
                            if not key.split("/")[1].isdigit()))

    def served_files(self, model: str) -> dict[str, str]:
        """Model-level objects and the pinned (else newest) version's, read and hashed."""
        versions = self.versions(model)
        hashes = {}
        for key in sorted(self.bucket.listing(f"{model}/")):
            part = key.split("/")[1]
            if part.isdigit() and (not versions or int(part) != versions[-1]):
                continue
            data = self.bucket.get(key)
            if data is not None:
                hashes[key] = hashlib.sha256(data).hexdigest()
        return hashes

    @contextlib.contextmanager
    def watching(self) -> Iterator[bool]:
        """Object stores have no lock a reader can hold: the journal's state says whether a publish is under way."""
        yield True


def _journal(record: dict[str, Any]) -> Journal:
    return journal_from(record)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _json(data: dict[str, Any]) -> bytes:
    import json

    return json.dumps(data, indent=2).encode()
