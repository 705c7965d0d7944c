"""The JSON part of an HTTP request checked before tritonserver parses it.

Triton 2.51's HTTP server parses a request's JSON with a recursive parser: `[` repeated 200,000 times (195 KB)
overflows its stack and kills the server (SIGSEGV), unauthenticated. No legitimate request nests deeply (an
inference request is an object of inputs, each holding a tensor of at most a few dimensions), so the front refuses
a JSON part nested deeper than `MAX_JSON_DEPTH` before forwarding a byte of it. Its size is bounded by the body's.

The check costs two `bytes.count` calls when a body holds at most MAX_JSON_DEPTH opening brackets (the binary
tensor extension's small JSON header, every control-plane call); beyond that, one vectorised pass over the quotes
and brackets, so that brackets inside strings do not count.
"""

from __future__ import annotations

import numpy as np

MAX_JSON_DEPTH = 64
JSON_HEADER_LENGTH = b"inference-header-content-length"  # Triton's binary tensor extension: JSON first, then bytes
_QUOTE, _OPENS, _CLOSES = 0x22, (0x5B, 0x7B), (0x5D, 0x7D)


class JsonRefused(ValueError):
    """A JSON part the front will not forward; the message says why."""


def json_depth(data: bytes) -> int:
    """How deeply the brackets of `data` nest outside its strings (a JSON document's depth; 0 for a scalar)."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # every quote left delimits a string
    codes = np.frombuffer(unescaped, np.uint8)
    marks = codes[(codes == _QUOTE) | (codes == _OPENS[0]) | (codes == _OPENS[1])
                  | (codes == _CLOSES[0]) | (codes == _CLOSES[1])]
    quote = marks == _QUOTE
    outside = (np.cumsum(quote, dtype=np.int64) % 2 == 0) & ~quote
    step = (np.isin(marks, _OPENS).astype(np.int64) - np.isin(marks, _CLOSES)) * outside
    return int(np.cumsum(step).max(initial=0))


def json_part_length(headers: dict[bytes, bytes], body_length: int) -> int:
    """How many leading bytes of a body are JSON: the binary extension's header, else the whole body."""
    raw = headers.get(JSON_HEADER_LENGTH)
    if raw is None:
        return body_length
    if not raw.strip().isdigit() or int(raw) > body_length:
        raise JsonRefused(f"Inference-Header-Content-Length {raw[:40]!r} is not a length within the body's "
                          f"{body_length} bytes")
    return int(raw)


def check_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """JsonRefused if `data` nests deeper than `max_depth`."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return
    depth = json_depth(data)
    if depth > max_depth:
        raise JsonRefused(f"the request's JSON nests {depth} levels deep, more than the {max_depth} this server "
                          "takes: send tensors flat (Triton takes row-major data in one array)")
