"""`patcher deploy` as a user runs it: the pods run the image the written Dockerfile builds, the next steps are
printed, and hostile inputs (issue 30 row 7) are refused or written inert: the manifests are read back."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from test_deploy import EXAMPLE, validate
from typer.testing import CliRunner

from patcher.cli import app

runner = CliRunner()
HOSTILE = "x$(AWS_SECRET_ACCESS_KEY)"


def read_back(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): yaml.safe_load(p.read_text()) for p in folder.rglob("*.yaml")}


def test_pods_run_the_image_the_dockerfile_builds_and_next_steps_are_printed(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    result = runner.invoke(app, ["deploy", str(EXAMPLE), "--kubernetes", str(out), "--pvc", "models",
                                 "--serving-image", "registry.example.com/ml/patcher-triton:1"])
    assert result.exit_code == 0, result.output
    documents = read_back(out)
    validate(documents)
    container = documents["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    dockerfile = (out / "Dockerfile").read_text()
    assert container["image"] == "registry.example.com/ml/patcher-triton:1"
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in dockerfile
    assert "docker build -t registry.example.com/ml/patcher-triton:1" in dockerfile
    assert documents["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"]["image"] == container["image"]
    steps = result.output.split("next steps:")[1]
    assert f"docker build -t registry.example.com/ml/patcher-triton:1 {out}" in steps
    assert "create secret generic patcher-triton-key" in steps and f"kubectl apply -f {out}" in steps

    default = runner.invoke(app, ["deploy", str(EXAMPLE), "--kubernetes", str(tmp_path / "d"), "--pvc", "models"])
    assert default.exit_code == 0, default.output
    assert read_back(tmp_path / "d")["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "patcher-triton:24.10-py3")
    assert "or rerun with --serving-image REGISTRY/patcher-triton:24.10-py3" in " ".join(default.output.split())


def test_a_rerun_is_told_a_flag_deploy_has(tmp_path: Path) -> None:
    arguments = ["deploy", str(EXAMPLE), "--kubernetes", str(tmp_path / "k8s"), "--pvc", "models"]
    assert runner.invoke(app, arguments).exit_code == 0
    again = runner.invoke(app, arguments)
    assert again.exit_code == 2 and "pass --overwrite to replace it, or another --kubernetes folder" in again.output
    assert runner.invoke(app, [*arguments, "--overwrite"]).exit_code == 0


def test_a_model_name_that_kubernetes_would_expand_is_written_inert(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "digits_text").rename(repo / HOSTILE)
    config = repo / HOSTILE / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "digits_text"', f'name: "{HOSTILE}"'))
    out = tmp_path / "k8s"
    result = runner.invoke(app, ["deploy", str(repo), "--kubernetes", str(out), "--pvc", "models"])
    assert result.exit_code == 0, result.output
    documents = read_back(out)
    for name in ("deployment.yaml", "kserve/inferenceservice.yaml"):
        spec = documents[name]["spec"]
        container = (spec["template"]["spec"]["containers"][0] if name == "deployment.yaml"
                     else spec["predictor"]["model"])
        args = container["args"]
        assert "--load-model=x$$(AWS_SECRET_ACCESS_KEY)" in args  # Kubernetes turns $$( into a literal $(
        expanded = [arg for arg in args if "$(" in arg.replace("$$(", "")]
        assert all("$(PATCHER_KEY)" in arg for arg in expanded), expanded  # the only expansion: the key


def test_hostile_image_names_and_tags_are_one_error_line(tmp_path: Path) -> None:
    for arguments, message in [(["--tag", "24.10-py3\nRUN curl http://evil"], "is not an image tag"),
                               (["--image", "nvcr.io/nvidia/tritonserver\nRUN x"], "is not an image name"),
                               (["--serving-image", "Bad Image:1"], "is not an image reference")]:
        done = runner.invoke(app, ["deploy", str(EXAMPLE), "--pvc", "models", "--kubernetes", str(tmp_path / "out"),
                                   *arguments])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.exit_code == 2 and len(errors) == 1 and message in errors[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_an_object_store_prefix_cannot_climb_out(tmp_path: Path) -> None:
    for repo in ("s3://models/prod/..", "s3://models/../other", "s3://http://127.0.0.1:9/models/./x"):
        done = runner.invoke(app, ["deploy", repo, "--kubernetes", str(tmp_path / "o")])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.exit_code == 2 and len(errors) == 1 and "would write keys outside it" in errors[0], done.stderr
    assert not (tmp_path / "o").exists()
