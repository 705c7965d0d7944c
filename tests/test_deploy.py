"""`patcher deploy`: the manifests validate against Kubernetes' schemas (kubernetes-validate, strict: unknown fields
are errors) and the InferenceService against KServe's CRD schema (tests/data, vendored from kserve/kserve), for a
repository folder on a claim and for one in an S3-compatible store."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from s3_support import BUCKET, s3_server
from typer.testing import CliRunner

from patcher.base.errors import PatcherError
from patcher.cli import app
from patcher.deploy.manifests import manifests, write_manifests
from patcher.deploy.settings import DeployOptions
from patcher.triton.repository.objectstore import ObjectStore

EXAMPLE = Path(__file__).parents[1] / "triton_models"
KSERVE_SCHEMA = Path(__file__).parent / "data" / "kserve-inferenceservice-v1beta1.schema.json.gz"
KUBERNETES = "1.30"
CUSTOM = ("ServiceMonitor", "InferenceService")


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [strict(item) for item in schema] if isinstance(schema, list) else schema


def kserve_validator() -> jsonschema.Draft7Validator:
    """KServe's InferenceService v1beta1 schema, strict."""
    schema = json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes()))["schema"]
    return jsonschema.Draft7Validator(strict(schema))


def validate(documents: dict[str, dict[str, Any]]) -> None:
    """Every manifest against its schema (ServiceMonitor: the fields Prometheus Operator requires)."""
    for name, document in documents.items():
        if document["kind"] == "InferenceService":
            kserve_validator().validate(document)
        elif document["kind"] == "ServiceMonitor":
            assert document["apiVersion"] == "monitoring.coreos.com/v1" and document["spec"]["endpoints"], name
        else:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_manifests_for_a_folder_on_a_claim_validate(tmp_path: Path) -> None:
    written = write_manifests(str(EXAMPLE), tmp_path / "k8s", DeployOptions(pvc="patcher-models", gpus=1))
    names = sorted(str(p.relative_to(tmp_path / "k8s")) for p in written)
    assert names == ["Dockerfile", "deployment.yaml", "hpa.yaml", "kserve/inferenceservice.yaml", "pdb.yaml",
                     "service.yaml", "servicemonitor.yaml"]
    documents = {p.name: yaml.safe_load(p.read_text()) for p in written if p.suffix == ".yaml"}
    validate(documents)
    pod = documents["deployment.yaml"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    loads = [a.removeprefix("--load-model=") for a in args if a.startswith("--load-model=")]
    assert len(loads) == len(set(loads)) == 12  # 9 image models and the open-vocabulary text, classify and embed
    assert loads.index("digits_preprocess") < loads.index("digits")  # composing models first
    assert loads.index("digits_pixels") < loads.index("digits_embed")
    assert "--model-repository=/models" in args and any("patcher-key=$(PATCHER_KEY)" in a for a in args)
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "patcher-triton-key", "key": "key"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        "/v2/health/ready", "/v2/health/live"}
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "patcher-models"
    isvc = documents["inferenceservice.yaml"]["spec"]["predictor"]
    assert isvc["model"]["storageUri"] == "pvc://patcher-models" and isvc["canaryTrafficPercent"] == 10
    assert "onnxruntime" in (tmp_path / "k8s" / "Dockerfile").read_text()  # the bundled flavour's classifiers


def test_the_checks_catch_what_kubernetes_and_kserve_refuse() -> None:
    documents, _ = manifests(str(EXAMPLE), DeployOptions(pvc="models"))
    broken = json.loads(json.dumps(documents["deployment.yaml"]))
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    isvc = json.loads(json.dumps(documents["kserve/inferenceservice.yaml"]))
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(jsonschema.ValidationError):
        kserve_validator().validate(isvc)
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 10
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://x"  # KServe spells it storageUri
    with pytest.raises(jsonschema.ValidationError):
        kserve_validator().validate(isvc)


def test_cpu_autoscaling_and_no_gpus_validate() -> None:
    documents, _ = manifests(str(EXAMPLE), DeployOptions(pvc="models", gpus=0, autoscale="cpu",
                                                         autoscale_target=70, replicas=1, max_replicas=3))
    validate(documents)
    assert documents["hpa.yaml"]["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    assert "nvidia.com/gpu" not in documents["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]


def test_bad_input_is_one_error_line(tmp_path: Path) -> None:
    for arguments, message in [([str(EXAMPLE)], "is a local folder: pods cannot read it"),
                               ([str(EXAMPLE), "--pvc", "Models"], "is not a Kubernetes name"),
                               ([str(tmp_path / "none"), "--pvc", "m"], "does not exist")]:
        done = CliRunner().invoke(app, ["deploy", *arguments, "--kubernetes", str(tmp_path / "out")])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.exit_code == 2 and len(errors) == 1 and message in errors[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_manifests_for_an_s3_repository_validate(tmp_path: Path) -> None:
    with s3_server() as endpoint:
        repo = f"s3://{endpoint}/{BUCKET}/prod"
        with pytest.raises(PatcherError, match="holds no models"):
            manifests(repo, DeployOptions())
        store = ObjectStore.from_uri(repo)
        staging = tmp_path / "staging"
        from patcher.triton.repository.publish import stage_model

        staged = []
        for model_dir in sorted(p for p in EXAMPLE.iterdir() if (p / "config.pbtxt").is_file()):
            item = stage_model(staging, model_dir.name, 1)
            for path in model_dir.iterdir():
                if path.is_file():
                    (item.model_dir / path.name).write_bytes(path.read_bytes())
            (item.version_dir / "patcher.json").write_text("{}")
            staged.append(item)
        with store.writing():
            store.publish(staging, staged, "digits", 1)
        documents, source = manifests(repo, DeployOptions(region="us-east-1"))
        validate(documents)
    assert source.repository == repo and source.storage_uri == f"s3://{BUCKET}/prod"
    container = documents["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--model-repository={repo}" in container["args"]
    assert {e["name"] for e in container["env"]} == {"PATCHER_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "AWS_DEFAULT_REGION"}
    assert documents["kserve/serviceaccount.yaml"]["secrets"] == [{"name": "patcher-s3"}]
    assert documents["kserve/inferenceservice.yaml"]["spec"]["predictor"]["serviceAccountName"] == (
        "patcher-triton-storage")
