"""Where a model repository lives: a local folder or an object store, behind one small interface.

    store = open_store("runs/triton_models")                     # LocalFolder: staging, renames, flock
    store = open_store("s3://http://127.0.0.1:9000/models/prod")  # ObjectStore (objectstore.py): uploads, no rename

The writer (`writer.py`) stages an update in a local folder and asks the store to publish it; `patcher serve`'s
supervisor asks the store for the journal and for what each model's files look like now. Only the publish step
and the listing differ between the two; the journal's meaning (publishing, then committed) is the same.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from patcher.base.errors import PatcherError
from patcher.base.faults import write_errors
from patcher.base.files import sha256_file
from patcher.base.locks import check_output_name, output_lock
from patcher.triton.repository.configs import CONFIG_FILE
from patcher.triton.repository.publish import Journal, Staged, new_staging, publish, publish_lock, read_journal, recover

OBJECT_SCHEMES = ("s3://", "gs://", "as://")
BYTECODE = "__pycache__"  # written by the python backend's stubs beside model.py; never published


class Store(Protocol):
    """A model repository patcher writes and serves: read, publish all or nothing, watch."""

    location: str  # what tritonserver's --model-repository takes, and what messages name
    pins_versions: bool  # True: configs name their version (`specific`), since objects appear one by one

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Exclude other writers (and turn the store's faults into one-line errors) for the block."""

    def recover(self) -> list[str]:
        """Finish or clean what an interrupted writer left; what was done, in words."""

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A local folder to stage one update in; removed when the block ends."""

    def publish(self, staging: Path, staged: list[Staged], entry: str, version: int | None) -> Journal:
        """Make the staged update visible all together, under the journal."""

    def journal(self) -> Journal:
        """The repository's journal."""

    def models(self) -> list[str]:
        """The models in the repository (those with a config.pbtxt)."""

    def versions(self, model: str) -> list[int]:
        """A model's committed version numbers, ascending."""

    def read(self, relative: str) -> str | None:
        """The text of a file, e.g. `<model>/config.pbtxt` or `<model>/<version>/patcher.json`; None if absent."""

    def signature(self, model: str) -> tuple[Any, ...]:
        """What a load of `model` reads: changes whenever a publish changed its files."""

    def watching(self) -> contextlib.AbstractContextManager[bool]:
        """Hold off writers while the block loads models if the store can (yields False: a writer is publishing)."""

    def served_files(self, model: str) -> dict[str, str]:
        """The sha256 of every file a load of `model` reads (`<model>/...`: model-level files, its newest version)."""


def model_versions(model_dir: Path) -> list[int]:
    """The numbered version directories of one model folder, ascending."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


class LocalFolder:
    """A repository folder: staged in a hidden sibling inside it, published by renames under the journal."""

    pins_versions = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = str(self.path.resolve())

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """The folder's output lock; the folder is made for the block (and removed again if the block fails)."""
        check_output_name(self.path)
        with write_errors(self.path), output_lock(self.path):
            created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                yield
            except BaseException:
                if created:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()
                raise

    def recover(self) -> list[str]:
        """Roll an interrupted publish forward and remove stale staging (publish.recover)."""
        return recover(self.path)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden folder inside the repository, so that publishing is renames on one filesystem."""
        folder = new_staging(self.path)
        try:
            with write_errors(self.path, folder):
                yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staging: Path, staged: list[Staged], entry: str, version: int | None) -> Journal:
        """publish.publish: journal "publishing", renames, journal "committed"."""
        return publish(self.path, staging, staged, entry, version)

    def journal(self) -> Journal:
        """The folder's journal file."""
        return read_journal(self.path)

    def models(self) -> list[str]:
        """Folders holding a config.pbtxt (hidden ones excluded)."""
        if not self.path.is_dir():
            raise PatcherError(f"model repository {self.path} does not exist: write one with `patcher triton RUN`")
        return sorted(p.name for p in self.path.iterdir()
                      if not p.name.startswith(".") and (p / CONFIG_FILE).is_file())

    def versions(self, model: str) -> list[int]:
        """Numbered version folders of the model."""
        return model_versions(self.path / model)

    def read(self, relative: str) -> str | None:
        """A file's text, None when it is absent or unreadable."""
        try:
            return (self.path / relative).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def signature(self, model: str) -> tuple[Any, ...]:
        """The newest version and the model-level files' modification times (warmup/ files among them)."""
        model_dir = self.path / model
        if not model_dir.is_dir():
            return (None, ())
        entries = [p for p in model_dir.iterdir() if not p.name.isdigit()]
        paths = [p for p in entries if p.is_file()] + [f for d in entries if d.is_dir() for f in d.rglob("*")]
        files = sorted((str(p.relative_to(model_dir)), p.stat().st_mtime_ns) for p in paths if p.is_file())
        versions = model_versions(model_dir)
        return (versions[-1] if versions else None, tuple(files))

    def watching(self) -> contextlib.AbstractContextManager[bool]:
        """The publish lock, not waited for: a writer holding it means "publishing now"."""
        return publish_lock(self.path, blocking=False)

    def served_files(self, model: str) -> dict[str, str]:
        """Model-level files and the newest version's, hashed (the python backend's `__pycache__` left out)."""
        model_dir = self.path / model
        versions = model_versions(model_dir)
        hashes = {}
        for path in sorted(model_dir.rglob("*")) if model_dir.is_dir() else []:
            parts = path.relative_to(model_dir).parts
            other_version = parts[0].isdigit() and (not versions or int(parts[0]) != versions[-1])
            if not path.is_file() or BYTECODE in parts or other_version:
                continue
            hashes[f"{model}/{'/'.join(parts)}"] = sha256_file(path)
        return hashes


def is_object_store(repo: Path | str) -> bool:
    """True for an object-store location (s3://, gs://, as://)."""
    return str(repo).startswith(OBJECT_SCHEMES)


def open_store(repo: Path | str | Store) -> Store:
    """The store a `--repo` value names: an object store for s3:// (gs://, as:// are refused), else a folder."""
    if not isinstance(repo, (str, Path)):
        return repo
    if is_object_store(repo):
        from patcher.triton.repository.objectstore import ObjectStore

        return ObjectStore.from_uri(str(repo))
    return LocalFolder(Path(repo))
