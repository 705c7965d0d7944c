"""Commands beyond one machine: Kubernetes manifests for a repository, and the gate before a rollout gets traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patcher.cli.shared import DataDir, HiddenName, Url, served_model
from patcher.deploy.triton_image import TRITON_IMAGE, TRITON_TAG


def deploy(
    repo: Annotated[str, typer.Argument(help="The repository: s3://BUCKET/PREFIX (s3://http://HOST:PORT/BUCKET/"
                                             "PREFIX), or a folder whose copy a claim holds (--pvc).")],
    kubernetes: Annotated[Path, typer.Option(help="Folder to write the manifests into.")],
    name: Annotated[str, typer.Option(help="Name of the Deployment, Service, ... and InferenceService.")] = (
        "patcher-triton"),
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    image: Annotated[str, typer.Option(help="Triton image (without tag) the Dockerfile builds on.")] = TRITON_IMAGE,
    tag: Annotated[str, typer.Option(help="Triton image tag (24.10-py3 is Triton 2.51).")] = TRITON_TAG,
    serving_image: Annotated[str | None, typer.Option(
        help="The image the pods run, built from the written Dockerfile (default NAME:TAG); REGISTRY/PATH:TAG "
             "for a registry your cluster pulls from.")] = None,
    gpus: Annotated[int, typer.Option(help="nvidia.com/gpu per pod (0: CPU only).")] = 1,
    cpu: Annotated[str, typer.Option(help="CPU per pod (requested and limited).")] = "2",
    memory: Annotated[str, typer.Option(help="Memory per pod (requested and limited).")] = "8Gi",
    replicas: Annotated[int, typer.Option(help="Pods at least (and the HPA's minimum).")] = 2,
    max_replicas: Annotated[int, typer.Option(help="Pods at most (HPA).")] = 6,
    autoscale: Annotated[str, typer.Option(help="pending-requests (Triton metric via the Prometheus adapter) or "
                                                "cpu.")] = "pending-requests",
    autoscale_target: Annotated[float, typer.Option(help="Pending requests per pod, or CPU percent.")] = 8.0,
    key_secret: Annotated[str, typer.Option(help="Secret holding the control-plane key (key `key`).")] = (
        "patcher-triton-key"),
    s3_secret: Annotated[str, typer.Option(help="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")] = (
        "patcher-s3"),
    region: Annotated[str | None, typer.Option(help="AWS_DEFAULT_REGION for the pods.")] = None,
    pvc: Annotated[str | None, typer.Option(help="Claim holding a copy of a local repository folder.")] = None,
    cache_pvc: Annotated[str | None, typer.Option(help="Claim for TensorRT engine caches (else emptyDir).")] = None,
    canary_percent: Annotated[int, typer.Option(help="KServe: traffic share of a new revision.")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace manifests already in the folder.")] = False,
) -> None:
    """Write Kubernetes manifests serving a repository with NVIDIA's Triton container, and a KServe alternative."""
    from patcher.deploy.manifests import next_steps, write_manifests
    from patcher.deploy.settings import DeployOptions

    options = DeployOptions(name=name, namespace=namespace, image=image, tag=tag, gpus=gpus, cpu=cpu, memory=memory,
                            replicas=replicas, max_replicas=max_replicas, autoscale=autoscale,
                            autoscale_target=autoscale_target, key_secret=key_secret, s3_secret=s3_secret,
                            region=region, pvc=pvc, cache_pvc=cache_pvc, canary_percent=canary_percent,
                            serving_image=serving_image)
    for path in write_manifests(repo, kubernetes, options, overwrite=overwrite):
        typer.echo(str(path))
    typer.echo("next steps:")
    for number, step in enumerate(next_steps(repo, kubernetes, options), 1):
        typer.echo(f"  {number}. {step}")


def verify(
    run: Annotated[Path, typer.Argument(help="The run directory the server is meant to serve.")],
    url: Url = "127.0.0.1:8001",
    model: Annotated[str | None, typer.Option(help="Served entry (default: the run's patch task).")] = None,
    name: HiddenName = None,
    tolerance: Annotated[float, typer.Option(help="Accuracy points a task may differ by (at least one image).")] = (
        1.0),
    limit: Annotated[int | None, typer.Option(help="Held-out images per task at most (default all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = 64,
    export: Annotated[Path | None, typer.Option(help="The run's export folder (default RUN/onnx).")] = None,
    repo: Annotated[str | None, typer.Option(help="The repository the server serves, whose files are checked "
                                                  "(default: the one its `patcher serve` key file names).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Classify the run's held-out images through the served entry, and check the files it serves: exit 2 with one
    error line if any task's accuracy differs from the manifest's (with --limit: the export's on the same images),
    the served classifier is not the run's, or a served file differs from what `patcher triton` published."""
    from patcher.base.progress import console
    from patcher.benchmark.verify_served import VerifyOptions, verify_served

    options = VerifyOptions(served_model(model, name), tolerance, limit, batch_size, data_dir, export=export, repo=repo)
    with console.status(f"verifying {run} against {url}: classifying its held-out images through the entry"):
        report = verify_served(run, url, options)
    for task, row in report["tasks"].items():
        typer.echo(f"{task}: served {row['served']:.2f}%, {row['against']} {row['reference']:.2f}% "
                   f"({row['difference']:+.2f}, allowed {row['allowed']:.2f}; {row['images']} images)")
    files = report["files"]
    typer.echo(f"files: {files['models']} models in {files['repository']} are what `patcher triton` published from "
               "the run's export" if files["checked"] else f"files: not checked ({files['why']}): pass --repo")
    typer.echo(f"verified: {report['model']} version {report['version']} on {url} serves {report['run']}")
