"""A repository in an S3-compatible store (moto's server on loopback): `patcher triton --repo s3://http://...`
publishes all or nothing without renames, `patcher serve --repo s3://...` serves it with the bundled tritonserver and
rolls out new versions, and `patcher triton` killed at several moments of an upload leaves nothing a server loads;
the next run completes it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import ForkedCLI, the_error_line, wait_for
from s3_support import BUCKET, objects, s3_server, text
from serving_support import Served, entry_models, variant, wait_for_version

from patcher.base.errors import PatcherError
from patcher.triton.client import ClassifyOptions, Endpoint, classify_files
from patcher.triton.repository.objectstore import INTENT, WRITER_LOCK, pinned_versions
from patcher.triton.repository.publish import JOURNAL
from patcher.triton.repository.s3 import Bucket, Digest, parse_location
from patcher.triton.repository.stores import open_store

# Of an uninterrupted upload's time, from when its intent appears; None: after the run ended, however long a loaded
# machine made it take (a timed spread alone left every kill 'uploading' in one CI run).
KILL_FRACTIONS = (0.0, 0.5, None)
# The kill rounds are served by the entry's ensemble alone (Triton loads its preprocessing and patched models with
# it): each rollout is one load instead of twelve (about 33 s on 2 shared cores), and the first two versions have
# already rolled out every model kind from the store.
ROUNDS_SERVED = ["digits"]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3_server() as url:
        yield url



def _top1(grpc: str, sample: Path) -> dict:
    """The served digits entry's best label for one image."""
    return classify_files([sample], "digits", endpoint=Endpoint(url=grpc), options=ClassifyOptions(top_k=1))[0]

def test_locations_are_what_triton_reads() -> None:
    assert parse_location("s3://http://127.0.0.1:9000/models/a/b").uri == "s3://http://127.0.0.1:9000/models/a/b"
    location = parse_location("s3://bucket.x/prefix_1/")
    assert (location.endpoint, location.bucket, location.prefix) == (None, "bucket.x", "prefix_1/")
    for bad, message in [("s3://Bucket/p", "Triton reads buckets"), ("s3://http://host/b/p", "HOST:PORT"),
                         ("gs://b/p", "S3 endpoint"), ("s3:/http:/h:1/b", "not an s3:// location"),
                         ("s3://b/models/..", "'.' or '..' parts would write keys outside it"),
                         ("s3://b/./m", "would write keys outside")]:
        with pytest.raises(PatcherError, match=message):
            parse_location(bad)


def test_uploads_are_verified_and_writers_exclude_each_other(endpoint: str) -> None:
    bucket = Bucket(parse_location(f"s3://{endpoint}/{BUCKET}/units"))
    digest = bucket.put("a/file", b"hello")
    assert digest == Digest.of(b"hello")
    with pytest.raises(PatcherError, match="does not hold the bytes uploaded"):
        bucket.verify("a/file", Digest.of(b"jello"))  # same size, other content
    with pytest.raises(PatcherError, match="holds 5 bytes, not the 6 uploaded"):
        bucket.verify("a/file", Digest.of(b"hello!"))
    with (bucket.lock("lock"), pytest.raises(PatcherError, match="is being written by pid"),
          Bucket(bucket.location).lock("lock")):
        pass
    dead = {"host": socket.gethostname(), "pid": 2**22 + 1, "time": time.time()}
    bucket.put("lock", json.dumps(dead).encode())  # left by a killed writer on this host
    with bucket.lock("lock"):
        assert json.loads(bucket.get("lock") or b"{}")["pid"] != dead["pid"]
    assert bucket.get("lock") is None


@pytest.mark.slow
def test_a_missing_bucket_is_one_error_line(endpoint: str, tiny_export: Path, tmp_path: Path) -> None:
    cli = ForkedCLI(tmp_path)
    try:
        code, stderr = cli.run("triton", str(tiny_export), "--repo", f"s3://{endpoint}/no-such-bucket/x")
    finally:
        cli.close()
    assert code == 2 and "no-such-bucket" in the_error_line(stderr), stderr


def pinned(endpoint: str, prefix: str, models: list[str]) -> dict[str, int]:
    """The version each model's config pins."""
    return {m: (pinned_versions(text(endpoint, f"{prefix}{m}/config.pbtxt")) or [0])[-1] for m in models}


def assert_pinned_versions_complete(endpoint: str, prefix: str, models: list[str], reference: dict[str, set]) -> None:
    """Every version a config names holds all of its objects: whatever Triton loads now is whole."""
    listing = objects(endpoint, prefix)
    for model, version in pinned(endpoint, prefix, models).items():
        names = {key.split("/", 2)[2] for key in listing if key.startswith(f"{model}/{version}/")}
        assert names == reference[model], (model, version, names)


def state(endpoint: str, prefix: str, serial: int) -> str:
    """What a killed upload left: untouched, uploading (intent, no journal yet), publishing, or complete."""
    journal = json.loads(text(endpoint, prefix + JOURNAL) or "{}")
    if journal.get("state") == "publishing":
        return "publishing"
    if text(endpoint, prefix + INTENT) is not None:
        return "uploading"
    return "complete" if journal.get("serial") == serial + 1 else "untouched"


@pytest.mark.slow
def test_s3_publish_serve_and_killed_uploads(endpoint: str, tiny_export: Path, tmp_path: Path) -> None:
    prefix = "fleet/"
    repo = f"s3://{endpoint}/{BUCKET}/{prefix}".rstrip("/")
    models = entry_models(tiny_export)
    sample = tiny_export / "samples" / "digits.png"
    (tmp_path / "cli").mkdir()
    cli = ForkedCLI(tmp_path / "cli")
    served = None
    try:
        code, stderr = cli.run("triton", str(tiny_export), "--repo", repo)
        assert code == 0, stderr
        reference = {m: {key.split("/", 2)[2] for key in objects(endpoint, prefix) if key.startswith(f"{m}/1/")}
                     for m in models}
        assert all(reference.values()) and all(pinned(endpoint, prefix, models)[m] == 1 for m in models)
        served = Served(repo, tmp_path / "key.json")  # type: ignore[arg-type]
        grpc = served.grpc_url
        first = _top1(grpc, sample)
        assert first["version"] == "1"

        started = time.perf_counter()  # version 2, uninterrupted: the upload's duration for the kills below
        child = cli.start("triton", str(variant(tiny_export, tmp_path / "v2", labels="{} v2")), "--repo", repo)
        anchor = wait_for(lambda: text(endpoint, prefix + INTENT) is not None or child.poll() is not None, 120,
                          interval=0.005)
        wait_for(lambda: child.poll() is not None, 300)
        assert child.poll() == 0, child.stderr()
        duration = time.perf_counter() - started - anchor
        import tritonclient.grpc as grpcclient

        live = grpcclient.InferenceServerClient(grpc)
        wait_for_version(live, models, "2", 120)
        label = _top1(grpc, sample)["tasks"]["digits"][0]["label"]
        assert label.endswith(" v2"), label
        live.close()
        partial = [line for line in served.lines if "failed" in line or "did not load" in line]
        assert served.stop() == 0 and partial == [], partial
        served = Served(repo, tmp_path / "key.json", models=ROUNDS_SERVED)  # type: ignore[arg-type]
        grpc = served.grpc_url
        live = grpcclient.InferenceServerClient(grpc)

        seen, version = [], 2
        for index, fraction in enumerate(KILL_FRACTIONS):
            tag = f"k{index}"
            export = variant(tiny_export, tmp_path / tag, labels="{} " + tag)
            serial = json.loads(text(endpoint, prefix + JOURNAL) or "{}")["serial"]
            child = cli.start("triton", str(export), "--repo", repo)
            wait_for(lambda c=child: text(endpoint, prefix + INTENT) is not None or c.poll() is not None, 120,
                     interval=0.005)
            if fraction is None:
                wait_for(lambda c=child: c.poll() is not None, 300)
            else:
                time.sleep(duration * fraction)
            child.kill9()
            seen.append(state(endpoint, prefix, serial))
            assert_pinned_versions_complete(endpoint, prefix, models, reference)
            answer = _top1(grpc, sample)  # the server keeps serving
            assert answer["version"] in {str(version), str(version + 1)}, answer
            code, stderr = cli.run("triton", str(export), "--repo", repo)
            assert code == 0, stderr
            version += 1
            assert set(pinned(endpoint, prefix, models).values()) == {version}
            leftovers = [k for k in objects(endpoint, prefix) if k.startswith((".patcher-staging-", INTENT,
                                                                               WRITER_LOCK))]
            assert leftovers == [] and not any(k.startswith(f"{m}/{version + 1}/") for m in models
                                               for k in objects(endpoint, prefix))
            wait_for_version(live, ROUNDS_SERVED, str(version), 120)
            label = _top1(grpc, sample)["tasks"]["digits"][0]["label"]
            assert label.endswith(f" {tag}"), label
        live.close()
        assert seen[0] in ("untouched", "uploading") and len(set(seen)) >= 2, seen
        partial = [line for line in served.lines if "failed" in line or "did not load" in line]
        assert partial == [], partial
        store = open_store(repo)
        assert store.versions(models[0]) == list(range(1, version + 1)) and not store.journal().publishing
    finally:
        if served is not None:
            assert served.stop() == 0
        cli.close()
