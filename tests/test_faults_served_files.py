"""Served files checked against what `patcher triton` published (issue #30, row 5), with the bundled tritonserver:
a graph put over `digits_classify/1/model.onnx`, in a folder or in an object store (moto's S3 server), is refused
before it loads, with one line naming it; `patcher verify` fails on any served model whose files differ from the
run's, every model kind; and `patcher verify --limit` judges a subset against the export on the same images
(issue #33)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from faults_support import run_patcher, the_error_line
from s3_support import BUCKET, client, s3_server
from serving_support import Served, patcher_triton
from triton_support import requires_bundled_triton

from patcher.base.errors import PatcherError
from patcher.triton.repository.integrity import check_integrity
from patcher.triton.repository.stores import open_store
from patcher.triton.serving.ports import distinct_free_ports

pytestmark = [pytest.mark.slow, requires_bundled_triton()]
TAMPERED = "digits_classify/1/model.onnx"


def _serve(repo: str | Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`patcher serve` that is expected to refuse to start."""
    http, grpc, metrics = distinct_free_ports(3)
    return run_patcher("serve", "--repo", str(repo), "--key-file", str(tmp_path / "refused.key.json"),
                       "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), timeout=300)


def _verify(run: Path, served: Served, export: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return run_patcher("verify", str(run), "--url", served.grpc_url, "--export", str(export), *options,
                       timeout=600)


def test_a_tampered_local_file_is_refused_before_it_loads(tiny_export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    patcher_triton(tiny_export, repo)
    check_integrity(open_store(repo), open_store(repo).models())  # as published: every file as recorded
    shutil.copyfile(tiny_export / "zeroshot.onnx", repo / TAMPERED)
    with pytest.raises(PatcherError, match=f"refusing to load digits_classify: .*{re.escape(TAMPERED)} differs"):
        check_integrity(open_store(repo), ["digits_classify"])
    refused = _serve(repo, tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert TAMPERED in the_error_line(refused.stderr) and "tritonserver ready" not in refused.stdout
    (repo / "digits_text" / "1" / "extra.py").write_text("print('not published')\n")
    with pytest.raises(PatcherError, match=r"digits_text/1/extra\.py was not published"):
        check_integrity(open_store(repo), ["digits_text"])


def test_a_tampered_object_is_refused_before_it_loads(tiny_export: Path, tmp_path: Path) -> None:
    with s3_server() as endpoint:
        repo = f"s3://{endpoint}/{BUCKET}/models"
        patcher_triton(tiny_export, repo)  # type: ignore[arg-type]
        client(endpoint).put_object(Bucket=BUCKET, Key=f"models/{TAMPERED}",
                                    Body=(tiny_export / "zeroshot.onnx").read_bytes())
        refused = _serve(repo, tmp_path)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        line = the_error_line(refused.stderr)
        assert f"{repo}/{TAMPERED} differs from what `patcher triton` published" in line, line


def test_verify_checks_every_served_file_and_judges_a_subset_on_the_same_images(
        tiny_run: Path, tiny_export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    patcher_triton(tiny_export, repo)
    served = Served(repo, tmp_path / "key.json")
    try:
        passed = _verify(tiny_run, served, tiny_export, "--repo", str(repo), "--limit", "200", "--tolerance", "0")
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "fashion-mnist: served" in passed.stdout and "the export on the same images" in passed.stdout
        assert "files: 12 models in" in passed.stdout, passed.stdout
        for tampered, source in [(TAMPERED, tiny_export / "zeroshot.onnx"),
                                 ("digits_text/1/model.py", repo / "digits_preprocess" / "1" / "model.py")]:
            original = (repo / tampered).read_bytes()
            shutil.copyfile(source, repo / tampered)
            failed = _verify(tiny_run, served, tiny_export, "--repo", str(repo), "--limit", "20")
            (repo / tampered).write_bytes(original)
            assert failed.returncode == 2, failed.stdout + failed.stderr
            line = the_error_line(failed.stderr)
            assert f"{tampered} differs from what `patcher triton` published" in line, line
    finally:
        assert served.stop() == 0
