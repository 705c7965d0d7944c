"""The GPU check's serving phase: the export written by `patcher triton` with a GPU instance group (KIND_GPU) and
served by the bundled tritonserver (bench/gpu_check.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from gpu_phases import Plan, image_size_of


def triton(plan: Plan, export_dir: Path, workdir: Path) -> dict[str, Any]:
    """The export written by `patcher triton` (KIND_GPU on a GPU) and served by the bundled tritonserver; load at each
    batch size; which processes hold GPU memory while it serves."""
    from patcher.benchmark.loadgen import Load, latency_summary, run_load, tensor_payload
    from patcher.export.contract import INPUT_NAME
    from patcher.triton.repository.configs import read_config
    from patcher.triton.repository.writer import RepositoryOptions, write_repository
    from patcher.triton.serving.server import ServerSettings, TritonServer

    cuda = plan.device.startswith("cuda")
    repo = workdir / "repo"
    written = write_repository(export_dir, repo, RepositoryOptions(max_batch_size=max(plan.infer_batches), gpu=cuda))
    model = f"{written.name}_patched"
    group = read_config(repo / model).instance_group[0]
    size = image_size_of(Path(export_dir) / "patched.onnx")
    added = _cuda_libraries_on_path() if cuda else []
    rows = []
    with TritonServer(repo, models=[model], settings=ServerSettings(startup_timeout_s=300)) as server:
        for batch_size in plan.infer_batches:
            array = np.random.default_rng(0).standard_normal((batch_size, 3, *size)).astype(np.float32)
            payload = tensor_payload(model, INPUT_NAME, array)
            concurrency = plan.triton_concurrency.get(batch_size, 1)
            warm = Load(concurrency=concurrency, duration_s=min(plan.seconds, 1.0), max_requests=10**6)
            run_load(server.grpc_url, payload, warm)  # warm-up
            load = run_load(server.grpc_url, payload,
                            Load(concurrency=concurrency, duration_s=plan.seconds, max_requests=10**6))
            rows.append({"batch": batch_size, "concurrency": concurrency, "failed": load.failed,
                         "images_per_s": round(batch_size * (load.rate or 0.0), 1),
                         "latency_ms": latency_summary(load.latencies_s)})
        gpu_processes = _gpu_processes(server.pgid) if cuda else []
        log = server.log_tail(200)
    kind_lines = [line.strip()[:200] for line in log.splitlines() if "GPU device" in line or "CPU device" in line]
    return {"model": model, "instance_group": {"kind": type(group).Kind.Name(group.kind), "count": group.count},
            "ld_library_path_added": added, "rows": rows, "server_gpu_processes": gpu_processes,
            "instance_log_lines": kind_lines[:6]}


def _gpu_processes(pgid: int | None) -> list[dict[str, Any]]:
    """nvidia-smi's compute processes that belong to the server's process group (its python backend stubs)."""
    smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    found = []
    for line in smi.stdout.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            try:
                group = os.getpgid(int(parts[0]))
            except ProcessLookupError:
                continue
            found.append({"pid": int(parts[0]), "name": parts[1], "memory": parts[2], "server's": group == pgid})
    return found


def _cuda_libraries_on_path() -> list[str]:
    """Put the CUDA libraries that pip packages carry (site-packages/nvidia/*/lib) on LD_LIBRARY_PATH, which the
    server's python stubs inherit: onnxruntime-gpu there loads its CUDA provider from them."""
    import site

    folders = sorted({str(lib) for root in site.getsitepackages() for lib in Path(root).glob("nvidia/*/lib")})
    current = os.environ.get("LD_LIBRARY_PATH", "")
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in [*folders, current] if p)
    return folders
