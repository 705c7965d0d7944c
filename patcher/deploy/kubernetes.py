"""Plain Kubernetes manifests: NVIDIA's Triton container as a Deployment, with what a production service needs.

    deployment.yaml       Triton (image tag a flag), the repository from s3:// or a claim, control plane keyed from a
                          Secret, startup/readiness/liveness probes on Triton's health endpoints, nvidia.com/gpu
    service.yaml          HTTP 8000, gRPC 8001, metrics 8002
    pdb.yaml              at most one pod down at a time (drains, upgrades)
    hpa.yaml              on Triton's pending requests per pod (Prometheus adapter) or on CPU
    servicemonitor.yaml   Prometheus Operator scrapes /metrics
"""

from __future__ import annotations

from typing import Any

from patcher.deploy.settings import DeployOptions, Source
from patcher.triton.serving.access import HEADER, RESTRICTED

KEY_ENV = "PATCHER_KEY"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PENDING_METRIC = "nv_inference_pending_request_count"
STARTUP_BUDGET_S = 900  # loading, warmup and TensorRT engine builds before the first READY


def labels(options: DeployOptions) -> dict[str, str]:
    """The labels every object carries and selectors match."""
    return {"app.kubernetes.io/name": options.name, "app.kubernetes.io/component": "triton",
            "app.kubernetes.io/managed-by": "patcher"}


def metadata(options: DeployOptions, name: str | None = None) -> dict[str, Any]:
    """Name, namespace and labels of one object."""
    return {"name": name or options.name, "namespace": options.namespace, "labels": labels(options)}


def server_args(options: DeployOptions, source: Source, repository: str | None = None) -> list[str]:
    """tritonserver's arguments: explicit models (composing first), the control plane restricted to the key."""
    restricted = f"{','.join(RESTRICTED)}:{HEADER}=$({KEY_ENV})"  # Kubernetes expands $(VAR) from the env
    args = [f"--model-repository={inert(repository or source.repository)}"] if repository != "" else []
    return [*args, "--model-control-mode=explicit", *[f"--load-model={inert(m)}" for m in source.models],
            "--strict-readiness=true", "--exit-on-error=true",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]


def inert(text: str) -> str:
    """`text` as a container argument Kubernetes passes unchanged: its `$(VAR)` expansion escaped as `$$(VAR)`."""
    return text.replace("$(", "$$(")


def key_env(options: DeployOptions) -> dict[str, Any]:
    """The control-plane key from its Secret (key `key`)."""
    return {"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": options.key_secret, "key": "key"}}}


def s3_env(options: DeployOptions) -> list[dict[str, Any]]:
    """Credentials as Triton's S3 client reads them, from the S3 Secret; the region where given."""
    env = [{"name": name, "valueFrom": {"secretKeyRef": {"name": options.s3_secret, "key": name}}}
           for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    return env + ([{"name": "AWS_DEFAULT_REGION", "value": options.region}] if options.region else [])


def resources(options: DeployOptions) -> dict[str, Any]:
    """CPU and memory requested and limited; GPUs limited (Kubernetes takes GPUs as limits only)."""
    limits: dict[str, Any] = {"cpu": options.cpu, "memory": options.memory}
    if options.gpus:
        limits["nvidia.com/gpu"] = options.gpus
    return {"requests": {"cpu": options.cpu, "memory": options.memory}, "limits": limits}


def probes() -> dict[str, Any]:
    """Startup (a generous budget for loads and warmup), readiness and liveness on Triton's health endpoints."""
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 3,
                "failureThreshold": failures}

    return {"startupProbe": probe("/v2/health/ready", 10, STARTUP_BUDGET_S // 10),
            "readinessProbe": probe("/v2/health/ready", 5, 2),
            "livenessProbe": probe("/v2/health/live", 10, 3)}


def _volumes(options: DeployOptions, source: Source) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]  # Triton copies s3 models under /tmp
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if not source.s3:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": options.pvc, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": source.repository, "readOnly": True})
    for index, path in enumerate(source.caches):
        cache = ({"persistentVolumeClaim": {"claimName": options.cache_pvc}} if options.cache_pvc
                 else {"emptyDir": {}})
        volumes.append({"name": f"trt-cache-{index}", **cache})
        mounts.append({"name": f"trt-cache-{index}", "mountPath": path})
    return volumes, mounts


def serving_image(options: DeployOptions, source: Source) -> str:
    """The image the pods run: the Dockerfile's build when python-backend models need its packages, else Triton's."""
    return options.built_image if source.python_models else f"{options.image}:{options.tag}"


def deployment(options: DeployOptions, source: Source) -> dict[str, Any]:
    """The Deployment: rolling updates that never go below the replica count (maxUnavailable 0)."""
    volumes, mounts = _volumes(options, source)
    container = {
        "name": "triton", "image": serving_image(options, source), "command": ["tritonserver"],
        "args": server_args(options, source),
        "env": [key_env(options), *(s3_env(options) if source.s3 else [])],
        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
        "resources": resources(options), **probes(), "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod = {"metadata": {"labels": labels(options)},
           "spec": {"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": 60,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000}}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(options),
            "spec": {"replicas": options.replicas, "selector": {"matchLabels": labels(options)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": pod}}


def service(options: DeployOptions) -> dict[str, Any]:
    """A ClusterIP Service on Triton's three ports."""
    ports = [{"name": name, "port": port, "targetPort": name} for name, port in PORTS.items()]
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(options),
            "spec": {"type": "ClusterIP", "selector": labels(options), "ports": ports}}


def disruption_budget(options: DeployOptions) -> dict[str, Any]:
    """At most one pod voluntarily down at a time."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(options),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(options)}}}


def autoscaler(options: DeployOptions) -> dict[str, Any]:
    """autoscaling/v2 on Triton's pending requests per pod (via the Prometheus adapter), or on CPU utilisation."""
    if options.autoscale == "cpu":
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": int(options.autoscale_target)}}}
    else:
        metric = {"type": "Pods", "pods": {"metric": {"name": PENDING_METRIC}, "target": {
            "type": "AverageValue", "averageValue": f"{options.autoscale_target:g}"}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": metadata(options),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": options.name},
                     "minReplicas": options.replicas, "maxReplicas": options.max_replicas, "metrics": [metric],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}


def service_monitor(options: DeployOptions) -> dict[str, Any]:
    """Prometheus Operator's ServiceMonitor for Triton's /metrics."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": metadata(options),
            "spec": {"selector": {"matchLabels": labels(options)}, "namespaceSelector": {"matchNames": [
                options.namespace]}, "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]}}


def kubernetes_manifests(options: DeployOptions, source: Source) -> dict[str, dict[str, Any]]:
    """file name -> manifest, for the plain Deployment."""
    return {"deployment.yaml": deployment(options, source), "service.yaml": service(options),
            "pdb.yaml": disruption_budget(options), "hpa.yaml": autoscaler(options),
            "servicemonitor.yaml": service_monitor(options)}
