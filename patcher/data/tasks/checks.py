"""Image files checked up front, from their headers, so a bad file is named before any work instead of
failing a DataLoader worker mid-training.

Per file: a regular file (a symlink is followed; a broken one is named), a format PIL identifies from the
header, a size PIL does not take for a decompression bomb and whose aspect ratio the resize can handle, and
the file's end: a PNG must end with its IEND chunk, a JPEG with its EOI marker (a JPEG without one near its
end is decoded at 1/8 scale to decide), so truncated files are found without decoding. Other formats are
decoded whole (they are rare here). Damage inside a whole-looking file is found only when it is decoded.
Results are cached per process by (path, size, mtime), so the train and held-out views check once; the cache
keeps the CACHED_FILES most recently checked files (a few tens of MB), so a long-lived process does not grow with
every dataset it has seen.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

MAX_ASPECT = 20  # a longer side over 20x the shorter makes the shortest-side resize explode (1 x 10^6 -> GBs)
SHOWN = 3  # offending files named in an error

CACHED_FILES = 200_000  # about 200 bytes each: the largest folder datasets here check once per process

_cache: OrderedDict[str, tuple[int, int, str | None]] = OrderedDict()


@dataclass
class SkipReport:
    """The unusable image files a user's dataset left out, by folder: pass one to `Task.dataset` to leave them out
    (without one they are refused)."""

    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """How many files were left out."""
        return sum(len(files) for files in self.skipped.values())


PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every complete PNG
JPEG_END = b"\xff\xd9"  # EOI
TAIL = 4096


def _tail(handle: BinaryIO, size: int) -> bytes:
    handle.seek(max(0, size - TAIL))
    return handle.read()


def _integrity(image: Image.Image, handle: BinaryIO, size: int) -> str | None:
    """None when the file is whole: PNG ends with IEND, JPEG ends with EOI (else decoded at 1/8 scale to be sure);
    other formats are decoded."""
    if image.format == "PNG":
        return None if _tail(handle, size).endswith(PNG_END) else "is truncated (no IEND chunk at its end)"
    if image.format in ("JPEG", "MPO"):
        if JPEG_END in _tail(handle, size).rstrip(b"\0"):
            return None
        image.draft("RGB", (1, 1))  # no end marker near the end: only decoding (at 1/8 scale) can tell
    image.load()
    return None


def _stat(path: str) -> os.stat_result | str:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return "is a broken symlink" if os.path.islink(path) else "has disappeared"
    except OSError as error:
        return f"cannot be read ({error.strerror})"


def image_problem(path: str, info: os.stat_result | str | None = None) -> str | None:
    """Why the file at `path` is no usable image, None when it is one (`info`: its os.stat, if already taken)."""
    info = _stat(path) if info is None else info
    if isinstance(info, str):
        return info
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as handle, Image.open(handle) as image:
            width, height = image.size
            if min(width, height) < 1:
                return f"has no pixels ({width}x{height})"
            if max(width, height) > MAX_ASPECT * min(width, height):
                return f"is {width}x{height} pixels, too elongated to resize (at most {MAX_ASPECT}:1)"
            return _integrity(image, handle, info.st_size)
    except Image.DecompressionBombError as error:
        return f"is a decompression bomb ({error})"
    except UnidentifiedImageError:
        return "is not an image (PIL cannot identify its format)"
    except OSError as error:
        if error.filename:
            return f"cannot be read ({error.strerror})"
        return f"is damaged ({' '.join(str(error).split()) or type(error).__name__})"
    except Exception as error:  # PIL's decoders also raise SyntaxError, ValueError, struct.error, ...
        return f"is damaged ({' '.join(str(error).split()) or type(error).__name__})"


def _cached_problem(path: str) -> str | None:
    info = _stat(path)
    key = (-1, -1) if isinstance(info, str) else (info.st_size, info.st_mtime_ns)
    cached = _cache.get(path)
    if cached is not None and cached[:2] == key:
        _cache.move_to_end(path)
        return cached[2]
    problem = image_problem(path, info)
    _cache[path] = (*key, problem)
    _cache.move_to_end(path)
    while len(_cache) > CACHED_FILES:
        _cache.popitem(last=False)
    return problem


def find_bad_images(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(path, problem) for every unusable image file among `paths`, in their order."""
    checked = ((path, _cached_problem(path)) for path in paths)  # ~30 us a file: threads only add GIL contention
    return [(path, problem) for path, problem in checked if problem is not None]


def describe(bad: list[tuple[str, str]]) -> str:
    """The first few offending files and why, for a one-line message."""
    shown = "; ".join(f"{path} {problem}" for path, problem in bad[:SHOWN])
    return shown + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
