"""The closed control plane: a secret key that Triton's restricted APIs demand, kept in a 0600 file.

Triton restricts whole API groups (`--http-restricted-api`, `--grpc-restricted-protocol`): a request to one of
them is refused unless it carries the header `<HEADER>: <key>` (HTTP) or the metadata
`triton-grpc-protocol-<HEADER>: <key>` (gRPC). Browsers cannot add such a header to a cross-origin request
without a CORS preflight, which Triton does not answer, so a web page cannot load models either.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.base.files import atomic_file

HEADER = "patcher-key"
GRPC_PREFIX = "triton-grpc-protocol-"
# Everything that changes the server (or reads its files): loading models with uploaded code, shared-memory
# registration, trace and log settings. Inference, health, metadata, model configs and statistics stay open.
RESTRICTED = ("model-repository", "shared-memory", "trace", "logging")
OPEN = ("health", "metadata", "inference", "model-config", "statistics")
KEY_BYTES = 32


@dataclass(frozen=True)
class ServerKey:
    """The key of one server, and the file it is kept in (None: held in memory only)."""

    value: str
    path: Path | None = None

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers for tritonclient.http calls to restricted APIs."""
        return {HEADER: self.value}

    @property
    def grpc_headers(self) -> dict[str, str]:
        """Metadata for tritonclient.grpc calls to restricted APIs."""
        return {GRPC_PREFIX + HEADER: self.value}

    def server_flags(self) -> list[str]:
        """tritonserver flags restricting every mutating API to requests that carry this key."""
        apis = ",".join(RESTRICTED)
        return [f"--http-restricted-api={apis}:{HEADER}={self.value}",
                f"--grpc-restricted-protocol={apis}:{HEADER}={self.value}"]


def new_key() -> ServerKey:
    """A fresh random key, held in memory."""
    return ServerKey(secrets.token_urlsafe(KEY_BYTES))


def cache_root() -> Path:
    """patcher's cache folder: $PATCHER_CACHE, else ~/.cache/patcher."""
    return Path(os.environ.get("PATCHER_CACHE") or Path.home() / ".cache" / "patcher")


def default_key_file(grpc_url: str) -> Path:
    """Where `patcher serve` keeps the key of the server at `grpc_url` (host:port), for patcher's other commands."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", grpc_url)
    return cache_root() / "serve" / f"{safe}.key.json"


def write_key_file(key: ServerKey, path: Path, endpoints: dict[str, str]) -> ServerKey:
    """Write the key (and the endpoints it opens) to `path`, readable by this user only (0600, folder 0700)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(path) as temporary:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from birth; umask only narrows it
        with os.fdopen(fd, "w") as handle:
            json.dump({"header": HEADER, "key": key.value, **endpoints, "pid": os.getpid()}, handle)
    return ServerKey(key.value, path)


def read_key_file(path: Path) -> ServerKey:
    """The key in a file `patcher serve` wrote; PatcherError if it is missing, malformed or readable by others."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = json.loads(path.read_text())
        value = str(data["key"])
    except FileNotFoundError:
        raise PatcherError(f"no server key at {path}: start the server with `patcher serve`, or pass --key-file") \
            from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PatcherError(f"cannot read the server key {path} ({error}): restart `patcher serve`") from None
    if mode & 0o077:
        raise PatcherError(f"{path} is readable by other users (mode {mode:o}): `chmod 600 {path}`, or restart "
                           "`patcher serve` to get a new key")
    return ServerKey(value, path)


def find_key(grpc_url: str, key_file: Path | None = None) -> ServerKey | None:
    """The key for the server at `grpc_url`: from `key_file` if given (PatcherError if unusable), else from the
    default file if `patcher serve` wrote a usable one there, else None."""
    if key_file is not None:
        return read_key_file(key_file)
    try:
        return read_key_file(default_key_file(grpc_url))
    except PatcherError:
        return None


def served_repository(grpc_url: str, key_file: Path | None = None) -> str | None:
    """The repository the `patcher serve` at `grpc_url` serves, from its key file; None when there is none."""
    try:
        return str(json.loads(Path(key_file or default_key_file(grpc_url)).read_text())["repository"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def live_owner(path: Path) -> str | None:
    """Who a key file belongs to if that server still runs ("pid N at host:port"), else None."""
    try:
        data = json.loads(Path(path).read_text())
        pid, grpc = int(data["pid"]), str(data["grpc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"pid {pid} at {grpc}"


def remove_key_file(key: ServerKey) -> None:
    """Delete the key's file (when its server stops)."""
    if key.path is not None:
        key.path.unlink(missing_ok=True)
