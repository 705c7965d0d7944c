"""The KServe alternative: an InferenceService on KServe's Triton runtime, new revisions behind a canary share.

KServe downloads `storageUri` into the pod (its storage initializer) and starts Triton on it; the container args
add patcher's: explicit models, strict readiness, the control plane keyed from a Secret. A new revision (after
`patcher triton` published a version, change any field, e.g. an annotation) gets `canaryTrafficPercent` of the
traffic until it is promoted; `patcher verify` against it is the gate.
"""

from __future__ import annotations

from typing import Any

from patcher.deploy.kubernetes import key_env, metadata, resources, server_args, serving_image
from patcher.deploy.settings import DeployOptions, Source


def storage_account(options: DeployOptions) -> dict[str, Any]:
    """The ServiceAccount whose Secret KServe's storage initializer reads the s3 credentials from."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(options, f"{options.name}-storage"),
            "secrets": [{"name": options.s3_secret}]}


def inference_service(options: DeployOptions, source: Source) -> dict[str, Any]:
    """A serving.kserve.io/v1beta1 InferenceService (modelFormat triton) on the repository."""
    image = ({"image": serving_image(options, source)} if source.python_models  # the runtime's image, with packages
             else {"runtimeVersion": options.tag})
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"}, **image, "storageUri": source.storage_uri,
        "args": server_args(options, source, repository=""), "env": [key_env(options)],
        "resources": resources(options),
    }
    predictor: dict[str, Any] = {"minReplicas": options.replicas, "maxReplicas": options.max_replicas,
                                 "canaryTrafficPercent": options.canary_percent, "model": model}
    if source.s3:
        predictor["serviceAccountName"] = f"{options.name}-storage"
    service = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata(options),
               "spec": {"predictor": predictor}}
    service["metadata"]["annotations"] = {"serving.kserve.io/enable-prometheus-scraping": "true"}
    return service


def kserve_manifests(options: DeployOptions, source: Source) -> dict[str, dict[str, Any]]:
    """file name -> manifest, for KServe."""
    manifests = {"kserve/inferenceservice.yaml": inference_service(options, source)}
    if source.s3:
        manifests["kserve/serviceaccount.yaml"] = storage_account(options)
    return manifests
