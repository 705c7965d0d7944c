"""Open-vocabulary serving of a run: label sets at request time against the baked heads, served by `patcher serve`.

    .venv/bin/python bench/open_vocab.py RUN [--duration 3] [--rounds 3] [--name open-vocab]

Exports RUN if needed (with its text tower), writes a repository in a temporary folder and serves it with
`patcher serve` (the bundled tritonserver, on free ports). Then, over gRPC:

- accuracy: every test image of the run's tasks classified by `<name>_classify` with the task's class names and
  templates against the baked `logits_<task>` (top-1 agreement, max |score - logit|), and two-label sets against
  the baked logits restricted to those two classes, computed in PyTorch on the same images;
- throughput: images/s of `<name>_classify` with a cached label set (the patch task's names and templates)
  against the baked `<name>_<task>_bytes`, batch 16, concurrency 1 and 2, measured side by side, interleaved
  ABBA over --rounds rounds of --duration s each (patcher's closed-loop load generator);
- text: prompts/s of `<name>_text` at batch 64;
- first request: the latency of a request with a label set never seen (its head computed: tokenised, embedded,
  averaged) against the same request again (the cached head), for label sets of 10 and 100 labels.

Writes bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from patcher.base.files import now_iso, write_json, write_text
from patcher.benchmark.loadgen import Load, Payload, bytes_payload, latency_summary, open_channel, run_load, warm_up
from patcher.benchmark.machine import load_average, machine_info

BATCH = 16
TEXT_BATCH = 64
PAIRS = {"digits": [("3", "8"), ("1", "7"), ("4", "9")],
         "fashion-mnist": [("shirt", "T-shirt/top"), ("sneaker", "ankle boot"), ("pullover", "coat")]}


class Serve:
    """`python -m patcher serve` on a repository, on free ports, until stopped."""

    def __init__(self, repo: Path, key_file: Path) -> None:
        from patcher.triton.serving.ports import distinct_free_ports

        http, grpc, metrics = distinct_free_ports(3)
        self.url = f"127.0.0.1:{grpc}"
        self.process = subprocess.Popen([sys.executable, "-m", "patcher", "serve", "--repo", str(repo), "--key-file",
                                         str(key_file), "--http-port", str(http), "--grpc-port", str(grpc),
                                         "--metrics-port", str(metrics)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:  # type: ignore[union-attr]
            if "Ctrl-C stops it" in line:
                return
        raise RuntimeError("patcher serve ended before it served")

    def stop(self) -> None:
        """SIGINT, as Ctrl-C."""
        import signal

        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_images(task: str) -> tuple[list[bytes], np.ndarray, list[Any]]:
    """Every test image of a task as PNG bytes, its labels, and the decoded images."""
    from patcher.data.tasks import get_task

    data = get_task(task).dataset("test")
    items = [data[i] for i in range(len(data))]
    return [_png(image) for image, _ in items], np.array([label for _, label in items]), [i for i, _ in items]


def _strings(values: list[str]) -> np.ndarray:
    return np.array([value.encode() for value in values], dtype=np.object_)


def infer_labels(client: Any, entry: str, blobs: list[bytes], labels: list[str], templates: list[str] | None
                 ) -> np.ndarray:
    """[N, L] scores from `<entry>_classify`, BATCH images per request."""
    import tritonclient.grpc as grpcclient

    parts = []
    for start in range(0, len(blobs), BATCH):
        chunk = np.array(blobs[start : start + BATCH], dtype=np.object_).reshape(-1, 1)
        inputs = [grpcclient.InferInput("image_bytes", list(chunk.shape), "BYTES"),
                  grpcclient.InferInput("labels", [len(labels)], "BYTES")]
        inputs[0].set_data_from_numpy(chunk)
        inputs[1].set_data_from_numpy(_strings(labels))
        if templates is not None:
            inputs.append(grpcclient.InferInput("templates", [len(templates)], "BYTES"))
            inputs[2].set_data_from_numpy(_strings(templates))
        parts.append(client.infer(f"{entry}_classify", inputs).as_numpy("scores"))
    return np.concatenate(parts)


def infer_baked(client: Any, entry: str, blobs: list[bytes], output: str) -> np.ndarray:
    """[N, C] baked logits from the entry's ensemble."""
    import tritonclient.grpc as grpcclient

    parts = []
    for start in range(0, len(blobs), BATCH):
        chunk = np.array(blobs[start : start + BATCH], dtype=np.object_).reshape(-1, 1)
        tensor = grpcclient.InferInput("image_bytes", list(chunk.shape), "BYTES")
        tensor.set_data_from_numpy(chunk)
        wanted = grpcclient.InferRequestedOutput(output)
        parts.append(client.infer(entry, [tensor], outputs=[wanted]).as_numpy(output))
    return np.concatenate(parts)


def torch_classifier(run: Path) -> Any:
    """The run's patched classifier in PyTorch and open_clip's eval transform: (images, task) -> logits."""
    import torch
    from safetensors.torch import load_file

    from patcher.data.transforms import eval_transform
    from patcher.models import build_from_config
    from patcher.models.classifier import MultiHeadClassifier
    from patcher.models.state import split_classifier_state

    config = json.loads((run / "open_clip_config.json").read_text())
    model = build_from_config(config)
    encoder, heads = split_classifier_state(load_file(str(run / "models" / "patched.safetensors")))
    model.visual.load_state_dict(encoder)
    classifier = MultiHeadClassifier(model.visual, heads).eval()
    transform = eval_transform(config["preprocess_cfg"])

    def logits(images: list[Any], task: str) -> np.ndarray:
        parts = []
        with torch.no_grad():
            for start in range(0, len(images), 256):
                batch = torch.stack([transform(image) for image in images[start : start + 256]])
                parts.append(classifier(batch, task)[task].numpy())
        return np.concatenate(parts)

    return logits


def accuracy(client: Any, entry: str, export: dict[str, Any], run: Path) -> dict[str, Any]:
    """Label sets against the baked heads on every test image of each task."""
    logits_of = torch_classifier(run)
    results: dict[str, Any] = {}
    for task, info in export["tasks"].items():
        blobs, labels, decoded = test_images(task)
        names, templates = info["classnames"], export["text"]["templates"][task]
        scores = infer_labels(client, entry, blobs, names, templates)
        baked = infer_baked(client, entry, blobs, info["output"])
        pairs = []
        torch_logits = logits_of(decoded, task)
        for pair in PAIRS.get(task, []):
            classes = [names.index(label) for label in pair]
            rows = np.flatnonzero(np.isin(labels, classes))
            served = np.array(classes)[infer_labels(client, entry, [blobs[i] for i in rows], list(pair),
                                                    templates).argmax(1)]
            restricted = np.array(classes)[torch_logits[rows][:, classes].argmax(1)]
            pairs.append({"labels": list(pair), "images": len(rows),
                          "served_accuracy": round(float((served == labels[rows]).mean() * 100), 3),
                          "torch_restricted_accuracy": round(float((restricted == labels[rows]).mean() * 100), 3),
                          "same_prediction": round(float((served == restricted).mean() * 100), 3)})
        results[task] = {
            "images": len(blobs),
            "top1_agreement": round(float((scores.argmax(1) == baked.argmax(1)).mean() * 100), 3),
            "max_abs_score_diff": float(np.abs(scores - baked).max()),
            "open_vocabulary_accuracy": round(float((scores.argmax(1) == labels).mean() * 100), 3),
            "baked_accuracy": round(float((baked.argmax(1) == labels).mean() * 100), 3),
            "two_label_sets": pairs,
        }
    return results


def classify_payload(entry: str, blobs: list[bytes], labels: list[str], templates: list[str]) -> Payload:
    """One `<entry>_classify` request serialised once: images, labels and templates as BYTES."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=f"{entry}_classify")
    arrays = {"image_bytes": np.array(blobs, dtype=np.object_).reshape(-1, 1), "labels": _strings(labels),
              "templates": _strings(templates)}
    for name, array in arrays.items():
        request.inputs.append(service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype="BYTES",
                                                                               shape=list(array.shape)))
        request.raw_input_contents.append(serialize_byte_tensor(array).item())
    return Payload(f"{entry}_classify", len(blobs), request.SerializeToString(), 1)


def throughput(url: str, entry: str, export: dict[str, Any], duration: float, rounds: int) -> list[dict[str, Any]]:
    """Images/s of the open-vocabulary model (cached label set) and the baked per-task model, ABBA interleaved."""
    task = next(t for t, info in export["tasks"].items() if info["role"] == "patch")
    blobs = test_images(task)[0][:BATCH]
    info = export["tasks"][task]
    baked = bytes_payload(f"{entry}_{task.replace('-', '_')}_bytes", "image_bytes", blobs, 1)
    open_vocabulary = classify_payload(entry, blobs, info["classnames"], export["text"]["templates"][task])
    rows = []
    channel = open_channel(url)
    for concurrency in (1, 2):
        totals: dict[str, Any] = {}
        for payload in (baked, open_vocabulary):
            warm_up(url, payload, concurrency, 20, channel=channel)
        for _ in range(rounds):
            for payload in (baked, open_vocabulary, open_vocabulary, baked):
                result = run_load(url, payload, Load(concurrency=concurrency, duration_s=duration), channel=channel)
                totals[payload.model] = totals[payload.model].merge(result) if payload.model in totals else result
        rates = {model: (result.rate or 0.0) * BATCH for model, result in totals.items()}
        failed = sum(result.failed for result in totals.values())
        rows.append({"concurrency": concurrency, "batch": BATCH, "baked_model": baked.model,
                     "open_vocabulary_model": open_vocabulary.model, "baked_images_per_s": round(rates[baked.model], 1),
                     "open_vocabulary_images_per_s": round(rates[open_vocabulary.model], 1),
                     "ratio": round(rates[open_vocabulary.model] / rates[baked.model], 3),
                     "latency_ms": {m: latency_summary(r.latencies_s) for m, r in totals.items()}, "failed": failed})
    channel.close()
    return rows


def text_rate(url: str, entry: str, export: dict[str, Any], duration: float) -> list[dict[str, Any]]:
    """Prompts/s of `<entry>_text` at batch TEXT_BATCH (the run's prompts)."""
    prompts = [t.format(c) for task, info in export["tasks"].items() for c in info["classnames"]
               for t in export["text"]["templates"][task]]
    blobs = [p.encode() for p in (prompts * (TEXT_BATCH // len(prompts) + 1))[:TEXT_BATCH]]
    payload = bytes_payload(f"{entry}_text", "text", blobs, 1)
    rows = []
    channel = open_channel(url)
    for concurrency in (1, 2):
        warm_up(url, payload, concurrency, 10, channel=channel)
        result = run_load(url, payload, Load(concurrency=concurrency, duration_s=2 * duration), channel=channel)
        rows.append({"concurrency": concurrency, "batch": TEXT_BATCH,
                     "prompts_per_s": round((result.rate or 0.0) * TEXT_BATCH, 1),
                     "latency_ms": latency_summary(result.latencies_s), "failed": result.failed})
    channel.close()
    return rows


def first_requests(client: Any, entry: str, export: dict[str, Any], sets: int = 8) -> list[dict[str, Any]]:
    """Latency of the first request with a new label set (head computed) and of the same request again (cached)."""
    task = next(t for t, info in export["tasks"].items() if info["role"] == "patch")
    blobs = test_images(task)[0][:BATCH]
    templates = export["text"]["templates"][task]
    words = [w.strip() for w in (Path(__file__).parent.parent / "README.md").read_text().split() if w.isalpha()]
    rows = []
    for size in (10, 100):
        first, again = [], []
        for number in range(sets):
            labels = [f"{words[(number * size + i) % len(words)]} {number}-{i}" for i in range(size)]
            for target in (first, again):
                started = time.perf_counter()
                infer_labels(client, entry, blobs, labels, templates)
                target.append(time.perf_counter() - started)
        rows.append({"labels": size, "templates": len(templates), "prompts": size * len(templates),
                     "batch": BATCH, "first_request_ms": latency_summary(np.array(first)),
                     "cached_request_ms": latency_summary(np.array(again))})
    return rows


def markdown(record: dict[str, Any]) -> str:
    """The Markdown report."""
    machine = record["machine"]
    lines = [f"# Open vocabulary: label sets at request time ({record['name']}, run {record['run']})", "",
             f"{record['created']}, {machine['cpu']} ({machine['usable_cores']} usable cores), load average "
             f"{record['load_average']}. Served by `patcher serve` (bundled Triton 2.51, python backend, one instance "
             f"per model, {record['classify_instances']} of the open-vocabulary model), gRPC. `bench/open_vocab.py` "
             "reproduces it.", "",
             "## Label sets against the baked heads (every test image)", "",
             "| task | images | top-1 agreement | max \\|score - logit\\| | open-vocabulary acc. | baked acc. |",
             "|---|---:|---:|---:|---:|---:|"]
    for task, row in record["accuracy"].items():
        lines.append(f"| {task} | {row['images']} | {row['top1_agreement']:.2f}% | {row['max_abs_score_diff']:.1e} | "
                     f"{row['open_vocabulary_accuracy']:.2f}% | {row['baked_accuracy']:.2f}% |")
    lines += ["", "Two-label sets (the task's templates) on the test images of those two classes, against the baked "
              "logits restricted to the two classes in PyTorch:", "",
              "| task | labels | images | served accuracy | PyTorch restricted | same prediction |",
              "|---|---|---:|---:|---:|---:|"]
    for task, row in record["accuracy"].items():
        for pair in row["two_label_sets"]:
            lines.append(f"| {task} | {', '.join(pair['labels'])} | {pair['images']} | {pair['served_accuracy']:.2f}% "
                         f"| {pair['torch_restricted_accuracy']:.2f}% | {pair['same_prediction']:.2f}% |")
    lines += ["", f"## Throughput, batch {BATCH}: cached label set against the baked head (ABBA, "
              f"{record['rounds']} rounds of {record['duration_s']} s each side)", "",
              "| concurrency | baked model | img/s | open-vocabulary model | img/s | ratio | failed |",
              "|---:|---|---:|---|---:|---:|---:|"]
    for row in record["throughput"]:
        lines.append(f"| {row['concurrency']} | `{row['baked_model']}` | {row['baked_images_per_s']} | "
                     f"`{row['open_vocabulary_model']}` | {row['open_vocabulary_images_per_s']} | {row['ratio']} | "
                     f"{row['failed']} |")
    lines += ["", f"## Text encoding (`_text`, batch {TEXT_BATCH})", "", "| concurrency | prompts/s | p50 ms |",
              "|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['prompts_per_s']} | {r['latency_ms']['p50']} |" for r in record["text"]]
    lines += ["", f"## A new label set: first request (head computed) against the same request again (cached), "
              f"batch {BATCH}", "", "| labels | prompts | first p50 ms | first max ms | cached p50 ms |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['labels']} | {r['prompts']} | {r['first_request_ms']['p50']} | {r['first_request_ms']['max']} | "
              f"{r['cached_request_ms']['p50']} |" for r in record["first_request"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Serve RUN, measure, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="open-vocab")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--classify-instances", type=int, default=0, help="0: as the other models (one)")
    args = parser.parse_args(argv)

    import tritonclient.grpc as grpcclient

    from patcher.stages.export import export_run
    from patcher.triton.repository.writer import RepositoryOptions, write_repository

    export_dir = export_run(args.run)
    export = json.loads((export_dir / "export.json").read_text())
    with tempfile.TemporaryDirectory(prefix="open-vocab-") as workdir:
        written = write_repository(export_dir, Path(workdir) / "repo",
                                   RepositoryOptions(open_vocab={"classify_instances": args.classify_instances}))
        entry = written.name
        server = Serve(Path(workdir) / "repo", Path(workdir) / "key.json")
        try:
            client = grpcclient.InferenceServerClient(server.url)
            record = {"name": args.name, "run": export["run"]["name"], "created": now_iso(), "machine": machine_info(),
                      "load_average": load_average(), "duration_s": args.duration, "rounds": args.rounds,
                      "classify_instances": args.classify_instances or 1,
                      "first_request": first_requests(client, entry, export),
                      "throughput": throughput(server.url, entry, export, args.duration, args.rounds),
                      "text": text_rate(server.url, entry, export, args.duration),
                      "accuracy": accuracy(client, entry, export, args.run)}
            client.close()
        finally:
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", record)
    write_text(args.out / f"{args.name}.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
