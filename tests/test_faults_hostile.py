"""What a hostile client, a power cut or a careless operator does to serving, without starting a server: request
totals and the server's decoding budget (shared by real processes), scratch folders of killed processes swept, logs
kept bounded while a process appends, repository paths refused up front, an export bound to its run, a republish
that changes nothing, and an open-file limit too low to serve."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from serving_support import environment, png

import patcher
from patcher.base.scratch import make_scratch, sweep_stale
from patcher.triton.imaging import DecodeBudget, ImageRejected, ServerBusy, check_limits, preprocess_bytes
from patcher.triton.repository.publish import JOURNAL, read_journal
from patcher.triton.repository.writer import RepositoryOptions, write_repository
from patcher.triton.serving import logs
from patcher.triton.serving.front import MAX_MESSAGE_BYTES, message_limit

ENVIRONMENT = {**environment(), "PYTHONPATH": str(Path(patcher.__file__).parents[1])}
SPEC = {"image_size": [28, 28], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "shortest"}


def _cli(*arguments: str, limit_files: int | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    def limited() -> None:
        if limit_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))

    return subprocess.run([sys.executable, "-m", "patcher", *arguments], capture_output=True, text=True,
                          timeout=timeout_s, env=environment(), preexec_fn=limited)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


# --- request totals and the server's decoding budget -------------------------------------------------------------


def test_a_request_is_bounded_as_a_whole_before_anything_is_decoded() -> None:
    small = png(40, 40, 3)
    assert preprocess_bytes([small] * 3, SPEC).shape == (3, 3, 28, 28)
    total, bound = 3 * len(small), 2 * len(small)
    with pytest.raises(ImageRejected, match=rf"request of 3 images, {total} bytes, exceeds max_request_bytes={bound}"):
        preprocess_bytes([small] * 3, SPEC, {"max_request_bytes": bound})
    bomb = png(6000, 6000)  # 36 megapixels in 30 KB: each passes max_pixels, five exceed the request's total
    with pytest.raises(ImageRejected, match=r"5 images decodes to 180000000 pixels, more than max_request_pixels"):
        preprocess_bytes([bomb] * 5, SPEC)
    # Headers only: the same images cut short after their header cannot be decoded, yet are refused for their size.
    header_only = bomb[:bomb.index(b"IDAT") + 68]
    with pytest.raises(ImageRejected, match="cannot decode image"):
        preprocess_bytes([header_only], SPEC)
    with pytest.raises(ImageRejected, match=r"5 images decodes to 180000000 pixels, more than max_request_pixels"):
        preprocess_bytes([header_only] * 5, SPEC)
    with pytest.raises(ValueError, match="max_server_pixels=1000000 is below max_pixels"):
        check_limits({"max_server_pixels": 1_000_000})


HOLDER = """
import sys, time
from patcher.triton.imaging import DecodeBudget
budget = DecodeBudget(int(sys.argv[2]), sys.argv[1])
with budget.hold(int(sys.argv[2])):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_the_decoding_budget_is_shared_by_processes_and_freed_when_one_dies(tmp_path: Path) -> None:
    path = tmp_path / "decode.budget"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "72000000"], stdout=subprocess.PIPE,
                              text=True, env=ENVIRONMENT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        budget = DecodeBudget(72_000_000, str(path))
        with pytest.raises(ServerBusy, match="max_server_pixels"), budget.hold(1_000_000, wait_s=0.5):
            pass
        holder.kill()  # kill -9: the kernel drops its locks
        holder.wait(timeout=30)
        with budget.hold(72_000_000, wait_s=0):  # the whole budget, at once
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


# --- scratch folders and logs ------------------------------------------------------------------------------------


SCRATCH = """
import sys, time
from patcher.base.scratch import make_scratch
print(make_scratch(sys.argv[1], __import__("pathlib").Path(sys.argv[2])).path, flush=True)
time.sleep(60)
"""


def test_scratch_folders_of_killed_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    def owner() -> tuple[subprocess.Popen[str], Path]:
        process = subprocess.Popen([sys.executable, "-c", SCRATCH, "patcher-test-", str(tmp_path)],
                                   stdout=subprocess.PIPE, text=True, env=ENVIRONMENT)
        assert process.stdout is not None
        return process, Path(process.stdout.readline().strip())

    (killed, stale), (alive, live) = owner(), owner()
    legacy = tmp_path / "patcher-test-legacy"  # an older version's folder: no lock file, touched just now
    legacy.mkdir()
    try:
        (stale / "tritonserver.log").write_text("x" * 1000)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        time.sleep(5.5)  # past the grace a brand-new folder gets before its lock is taken
        assert sweep_stale("patcher-test-", tmp_path) == [stale]
        assert live.is_dir() and legacy.is_dir()
        mine = make_scratch("patcher-test-", tmp_path)
        assert mine.path.is_dir() and not stale.exists()
        mine.remove()
        assert not mine.path.exists()
        old = time.time() - 2 * 24 * 3600
        os.utime(legacy, (old, old))
        assert sweep_stale("patcher-test-", tmp_path) == [legacy]
    finally:
        alive.kill()
        alive.wait(timeout=30)


APPENDER = """
import sys, time
line = b"E1203 an error line that tritonserver repeats as fast as it can, ulimit -n 64 style\\n"
with open(sys.argv[1], "ab", buffering=0) as log:
    while True:  # 32 MB a second, the rate the issue saw (64 MB in 2 s)
        log.write(line * (320_000 // len(line)))
        time.sleep(0.01)
"""


def test_a_log_stays_bounded_while_its_writer_floods_it(tmp_path: Path) -> None:
    log = tmp_path / "tritonserver.log"
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(log)])
    sizes, cuts = [], 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            cuts += logs.trim(log, max_bytes=4 << 20)
            sizes.append(log.stat().st_size if log.exists() else 0)
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert cuts >= 2, sizes  # it did flood: several MB a second
    assert max(sizes) < (4 << 20) + (12 << 20)  # the bound, plus what 32 MB/s adds between two looks (and slack)
    with open(log, "rb") as handle:
        assert handle.read(5) == b"E1203"  # written on at the new start, no hole of zeros
    kept = (tmp_path / "tritonserver.log.1").read_bytes()
    assert kept.startswith(b"[... earlier lines cut") and len(kept) < logs.LOG_KEEP_BYTES + 200


# --- paths, exports and republishing -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["my repo", "répo", "$(touch MARKER)"])
def test_repository_paths_triton_cannot_take_are_refused_up_front(tiny_export: Path, tmp_path: Path,
                                                                  name: str) -> None:
    repo = tmp_path / name
    line = _one_error_line(_cli("triton", str(tiny_export), "--repo", str(repo)))
    assert "cannot start python models from" in line and str(repo) in line
    assert not repo.exists() and not (Path.cwd() / "MARKER").exists()
    repo.mkdir()
    line = _one_error_line(_cli("serve", "--repo", str(repo), "--grpc-port", "0", "--http-port", "0",
                                "--metrics-port", "0", "--key-file", str(tmp_path / "key.json"), timeout_s=60))
    assert "cannot start python models from" in line and not (tmp_path / "key.json").exists()


def test_a_temporary_folder_triton_cannot_take_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    repo, temporary = tmp_path / "repo", tmp_path / "tmp dir"
    write_repository(tiny_export, repo)
    temporary.mkdir()
    done = subprocess.run([sys.executable, "-m", "patcher", "serve", "--repo", str(repo), "--grpc-port", "0",
                           "--http-port", "0", "--metrics-port", "0", "--key-file", str(tmp_path / "key.json")],
                          capture_output=True, text=True, timeout=120, env={**environment(), "TMPDIR": str(temporary)})
    line = _one_error_line(done)
    assert line.startswith("error: temporary folder (TMPDIR) path") and "contains a space" in line
    assert not list(temporary.iterdir()) and not (tmp_path / "key.json").exists()


def test_an_export_is_written_into_a_repository_only_under_its_own_run(tiny_run: Path, tiny_export: Path,
                                                                       tmp_path: Path) -> None:
    own, other = tmp_path / "runA", tmp_path / "runB"
    for run in (own, other):
        shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("onnx"))
        shutil.copytree(tiny_export, run / "onnx")  # as `patcher export runA --out runB/onnx --overwrite` leaves it
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "runB"
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2))
    line = _one_error_line(_cli("triton", str(other), "--repo", str(tmp_path / "repo")))
    assert "was exported from 'tiny'" in line and f"not from the run it sits in, {other}" in line
    assert "patcher export" in line and not (tmp_path / "repo").exists()
    _one_error_line(_cli("triton", str(other / "onnx"), "--repo", str(tmp_path / "repo")))  # the folder itself too
    done = _cli("triton", str(own), "--repo", str(tmp_path / "repo"))
    assert done.returncode == 0 and "wrote version 1 of digits" in done.stdout, done.stderr


def test_republishing_an_export_already_there_moves_no_serial_and_touches_no_file(tiny_export: Path,
                                                                                   tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = write_repository(tiny_export, repo)

    def stamps() -> dict[str, int]:
        return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()}

    before = stamps()
    again = write_repository(tiny_export, repo)
    assert not again.new_version and again.serial == first.serial == read_journal(repo).serial
    assert stamps() == before  # the journal included: `patcher serve` sees nothing to reload
    # one model's config changes
    limited = write_repository(tiny_export, repo, RepositoryOptions(limits={"max_bytes": 1 << 20}))
    assert limited.serial == first.serial + 1
    changed = {path for path, stamp in stamps().items() if before.get(path) != stamp}
    assert changed == {"digits_preprocess/config.pbtxt", "digits_classify/config.pbtxt", JOURNAL}  # both decode


def test_the_front_takes_a_full_batch_of_any_input_and_the_largest_image_request(tiny_export: Path,
                                                                                 tmp_path: Path) -> None:
    write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(max_batch_size=64))
    assert message_limit(tmp_path / "repo") == MAX_MESSAGE_BYTES  # 28 px: 64 x 3 x 28 x 28 floats is far less
    write_repository(tiny_export, tmp_path / "big",
                     RepositoryOptions(max_batch_size=8192, limits={"max_request_bytes": 1 << 20}))
    assert message_limit(tmp_path / "big") == 8192 * 3 * 28 * 28 * 4 + (1 << 20)


# --- the open-file limit ---------------------------------------------------------------------------------------------


def test_an_open_file_limit_too_low_to_serve_is_one_error_line_and_leaves_nothing(tiny_export: Path,
                                                                                   tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(tiny_export, repo)
    before = set(Path(tempfile.gettempdir()).glob("patcher-triton-*"))
    done = _cli("serve", "--repo", str(repo), "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
                "--key-file", str(tmp_path / "key.json"), limit_files=64, timeout_s=120)
    line = _one_error_line(done)
    assert "the open-file limit is 64 (ulimit -n)" in line and "ulimit -n 4096" in line
    assert not (tmp_path / "key.json").exists()
    assert set(Path(tempfile.gettempdir()).glob("patcher-triton-*")) - before == set()
