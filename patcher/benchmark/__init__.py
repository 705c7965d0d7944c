"""`patcher bench`: throughput and latency of the patched model against zero-shot and the output-space ensemble.

    report = bench_run(Path("runs/digits-ft-..."))          # serves the run itself on free ports, sweeps, writes
    report = bench_url("127.0.0.1:8001", ["digits_patched", "digits_zeroshot"])   # an already running server
    Console().print(format_table(report))

Both write `<name>.json`, `<name>.md` and `<name>.png` into out_dir (bench/results by default). Attributes load on
first use, so importing a submodule (e.g. `patcher.bench.defaults`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"bench_run": "runner", "bench_url": "runner", "format_table": "report", "markdown": "report"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
