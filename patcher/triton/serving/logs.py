"""tritonserver's log: kept below a size, read for the line that explains a failure, and kept after one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from patcher.base.cache import cache_dir

LOG_MAX_BYTES = 16 << 20  # a log past this is cut to its last LOG_KEEP_BYTES (saved beside it as `<log>.1`)
LOG_KEEP_BYTES = 1 << 20
KEPT_LOGS = 20  # failure logs kept in the cache, newest first


def kept_logs_dir() -> Path:
    """Where the logs that explain a failed start or a crash are kept (the cache's serve/logs)."""
    return cache_dir("serve") / "logs"


def kept_log_path(pgid: int) -> Path:
    """A new name among the kept logs for the log of the server whose process group is `pgid`."""
    return kept_logs_dir() / f"tritonserver-{time.strftime('%Y%m%d-%H%M%S')}-{pgid}.log"


def keep(path: Path, target: Path) -> Path:
    """Move a log that explains a failure to `target` (among the kept logs, of which the oldest go); `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    kept = sorted(kept_logs_dir().glob("tritonserver-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[KEPT_LOGS:]:
        old.unlink(missing_ok=True)
    return target


def trim(path: Path, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Past `max_bytes`, save the log's last LOG_KEEP_BYTES as `<log>.1` and empty it (tritonserver appends, so it
    writes on at the new end). True if it was cut."""
    try:
        size = path.stat().st_size
        if size <= max_bytes:
            return False
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)  # the writer appends on: read a bounded tail from the end as it is now
            handle.seek(max(0, end - LOG_KEEP_BYTES))
            tail = handle.read(LOG_KEEP_BYTES)
        note = f"[... earlier lines cut: the log is kept below {max_bytes} bytes]\n".encode()
        path.with_name(path.name + ".1").write_bytes(note + tail)
        os.truncate(path, 0)
    except OSError:
        return False
    return True


def _lines(path: Path | None) -> list[str]:
    if path is None or not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()


def tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a log."""
    return "\n".join(_lines(path)[-lines:])


def last_error_line(path: Path | None, model: str | None = None, errors_only: bool = False) -> str:
    """A log's last error line (about `model` if one mentions it; else its last line unless `errors_only`); CUDA
    warnings of a CPU-only host aside."""
    lines = _lines(path)
    errors = [ln for ln in lines if ln.startswith("E") or "failed to load" in ln or "error" in ln.lower()]
    errors = [ln for ln in errors if "cuda" not in ln.lower()]
    about = [ln for ln in errors if model and model in ln]
    return (about or errors or ([] if errors_only else lines) or [""])[-1].strip()
