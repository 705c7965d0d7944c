"""`patcher verify --url HOST:PORT RUN`: the gate before traffic moves to a rollout. The run's held-out images go
through the served entry (encoded images in, as clients send them); every task's accuracy must match the manifest's
held-out accuracy at the chosen alpha (with `--limit`, a subset: the run's export run in process on the same images,
since a subset's accuracy is not the whole split's), the served classifier must be the run's (hashes in its
config), and every served file of the entry must be what `patcher triton` published from the run's export
(`served_files.py`; the repository from `--repo`, else from the server's key file)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.export.contract import EXPORT_JSON, read_export_record, tensor_name
from patcher.runs.layout import EXPORT_DIR
from patcher.runs.manifest import Run, load_run
from patcher.triton.client import connect, describe_model
from patcher.triton.repository.configs import IMAGE_BYTES
from patcher.triton.repository.provenance import ONNX, RUN_MANIFEST

SPLIT = "val"  # the held-out split alpha was chosen on: its accuracies are in the manifest


@dataclass(frozen=True)
class VerifyOptions:
    """The served entry (default: the run's patch task), the tolerance in points, images per task, batch size."""

    name: str | None = None
    tolerance: float = 1.0
    limit: int | None = None
    batch_size: int = 64
    data_dir: Path | None = None
    timeout_s: float = 60.0
    export: Path | None = None  # the run's export (default RUN/onnx), whose patched files the server must serve
    repo: str | None = None  # the repository the server serves (default: the one its key file names)


def manifest_accuracy(run: Run) -> dict[str, float]:
    """The patched model's held-out accuracy per task at the chosen alpha (the alpha curve's point)."""
    alpha = run.manifest.alpha
    points = [p for p in alpha.curve if abs(p.alpha - alpha.chosen) < 1e-9]
    if not points:
        raise PatcherError(f"{run.path}/manifest.json records no held-out accuracy at alpha {alpha.chosen}: "
                           "nothing to verify against")
    return dict(points[-1].val_accuracy)


def heldout_items(task: str, limit: int | None, data_dir: Path | None,
                  source: str | None = None) -> tuple[list[bytes], np.ndarray]:
    """The task's held-out images as PNG bytes (what a client sends) and their labels; evenly spaced if limited."""
    from patcher.data.tasks import task_of
    from patcher.export.heldout import evenly_spaced

    dataset = task_of(task, source).dataset(SPLIT, data_root=data_dir)
    indices = evenly_spaced(len(dataset), limit) if limit else range(len(dataset))
    images, labels = [], []
    for index in indices:
        image, label = dataset[index]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
        labels.append(int(label))
    return images, np.asarray(labels)


def served_hashes(client: Any, model: str, timeout_s: float) -> dict[str, str]:
    """The provenance parameters of a served model's config."""
    config = client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()
            if key in (ONNX, RUN_MANIFEST)}


def provenance_problems(run: Run, hashes: dict[str, str], model: str, export: Path | None = None) -> list[str]:
    """Why the served classifier is not the run's patched model (empty when it is)."""
    problems = []
    if hashes.get(RUN_MANIFEST) != run.manifest_sha256:
        problems.append(f"{model} serves run manifest {hashes.get(RUN_MANIFEST, 'unrecorded')[:12]}, not "
                        f"{run.name}'s ({run.manifest_sha256[:12]})")
    export_json = Path(export or run.path / EXPORT_DIR) / EXPORT_JSON
    if export is not None and not export_json.is_file():
        raise PatcherError(f"{export} has no {EXPORT_JSON}: pass the run's `patcher export` folder")
    if export_json.is_file():
        record = read_export_record(export_json)
        patched = {m.sha256 for m in record.models.values() if m.model == "patched"}
        if hashes.get(ONNX) not in patched:
            others = {m.sha256: key for key, m in record.models.items()}
            which = others.get(hashes.get(ONNX, ""), "no file of the run's export")
            problems.append(f"{model} serves {which} ({hashes.get(ONNX, 'unrecorded')[:12]}), not the run's "
                            "patched model")
    return problems


def reference_accuracy(export: Path, task: str, images: list[bytes], labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of the export's patched graph, in process, on the same encoded images."""
    from patcher.triton.onnxruntime_local import LocalModel

    results = LocalModel(export).classify_tasks(images, [f"image {i}" for i in range(len(images))], top_k=1)
    predicted = np.array([result[task][0]["index"] for result in results])
    return round(100.0 * float((predicted == labels).mean()), 4)


def heldout_size(task: str, data_dir: Path | None, source: str | None = None) -> int:
    """How many held-out images the task has."""
    from patcher.data.tasks import task_of

    return len(task_of(task, source).dataset(SPLIT, data_root=data_dir))


def served_accuracy(client: Any, model: str, output: str, images: list[bytes], labels: np.ndarray,
                    options: VerifyOptions) -> float:
    """Top-1 accuracy in percent of one task's logits from the served entry, images sent as encoded bytes."""
    import tritonclient.grpc as grpcclient

    predicted = []
    for start in range(0, len(images), options.batch_size):
        chunk = np.array(images[start : start + options.batch_size], dtype=np.object_).reshape(-1, 1)
        tensor = grpcclient.InferInput(IMAGE_BYTES, list(chunk.shape), "BYTES")
        tensor.set_data_from_numpy(chunk)
        response = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(output)],
                                client_timeout=options.timeout_s)
        predicted.append(response.as_numpy(output).argmax(axis=1))
    return round(100.0 * float((np.concatenate(predicted) == labels).mean()), 4)


def verify_served(run_path: Path, url: str, options: VerifyOptions | None = None) -> dict[str, Any]:
    """Check the served entry against the run; the report, or PatcherError (one line) naming every problem."""
    options = options or VerifyOptions()
    run = load_run(run_path)
    export = Path(options.export or run.path / EXPORT_DIR)
    if options.limit and not (export / EXPORT_JSON).is_file():
        raise PatcherError(f"--limit judges a subset against the run's export on the same images, and {export} has "
                           f"no {EXPORT_JSON}: run `patcher export {run.path}`, pass --export, or drop --limit")
    name = options.name or tensor_name(run.manifest.patch_tasks[0])
    expected = manifest_accuracy(run)
    client = connect(url, options.timeout_s)
    try:
        served = describe_model(client, name, url, options.timeout_s)
        patched = f"{name}_patched"
        hashes = served_hashes(client, patched, options.timeout_s)
        problems = provenance_problems(run, hashes, patched, options.export)
        entry = _Entry(client=client, name=name, export=export, options=options)
        tasks = {}
        for task, (output, _) in served.tasks.items():
            if task in expected:
                tasks[task] = _judge_task(entry, (task, output, run.manifest.tasks[task].source), expected[task],
                                          problems)
    finally:
        client.close()
    files = _served_files(run_path, url, name, export, options, problems)
    if not tasks:
        problems.append(f"{name} on {url} serves none of the run's tasks ({', '.join(expected)})")
    report = {"run": run.name, "url": url, "model": name, "version": served.version, "tasks": tasks,
              "hashes": hashes, "files": files, "passed": not problems}
    if problems:
        raise PatcherError(f"{name} version {served.version} on {url} fails verification: {'; '.join(problems)}")
    return report


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """The served entry under verification: the client asking it, its name, the run's export and the options."""

    client: Any
    name: str
    export: Path
    options: VerifyOptions


def _judge_task(entry: _Entry, served_task: tuple[str, str, str | None], manifest: float,
                problems: list[str]) -> dict[str, Any]:
    """One task's served accuracy against the manifest's (all images) or the export's on the same subset;
    `served_task` is (task, output tensor, where the task's data lives)."""
    task, output, source = served_task
    options = entry.options
    images, labels = heldout_items(task, options.limit, options.data_dir, source)
    accuracy = served_accuracy(entry.client, entry.name, output, images, labels, options)
    if options.limit and options.limit < heldout_size(task, options.data_dir, source):
        reference = reference_accuracy(entry.export, task, images, labels)
        against = "the export on the same images"
    else:
        reference, against = manifest, "the manifest"
    allowed = max(options.tolerance, 100.0 / max(len(labels), 1))  # at least one image's worth
    difference = accuracy - reference
    if abs(difference) > allowed + 1e-9:
        problems.append(f"{task}: served {accuracy:.2f}% against {against}'s {reference:.2f}% "
                        f"({difference:+.2f} points, more than {allowed:.2f})")
    return {"served": accuracy, "reference": round(reference, 4), "against": against,
            "manifest": round(manifest, 4), "difference": round(difference, 4), "allowed": round(allowed, 4),
            "images": len(labels)}


def _served_files(run_path: Path, url: str, name: str, export: Path, options: VerifyOptions,
                  problems: list[str]) -> dict[str, Any]:
    """The entry's served files checked against the journal and the export; what was checked, for the report."""
    from patcher.benchmark.served_files import served_file_problems
    from patcher.triton.serving.access import served_repository

    repo = options.repo or served_repository(url)
    if repo is None or not (export / EXPORT_JSON).is_file():
        return {"checked": False, "why": "no --repo and no key file of the server" if repo is None
                else f"no export at {export}"}
    found, models = served_file_problems(repo, name, export)
    problems += found
    return {"checked": True, "repository": str(repo), "models": models}
