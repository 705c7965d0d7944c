"""An S3-compatible store on loopback for the tests: moto's server (an emulator; PyPI has no real S3 server, and
Debian's radosgw needs a Ceph cluster), in its own process, with a bucket and credentials in the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from patcher.triton.serving.ports import distinct_free_ports

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "patcher-test", "AWS_SECRET_ACCESS_KEY": "patcher-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "models"


@contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 with `bucket`; yields its endpoint (http://127.0.0.1:PORT)."""
    (port,) = distinct_free_ports(1)
    previous = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "moto's server did not start"
                time.sleep(0.1)
        client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(endpoint: str) -> Any:
    """A boto3 client of the store."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def objects(endpoint: str, prefix: str, bucket: str = BUCKET) -> dict[str, int]:
    """Every object under `prefix` (relative key -> size)."""
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"].removeprefix(prefix): item["Size"] for page in pages for item in page.get("Contents", [])}


def text(endpoint: str, key: str, bucket: str = BUCKET) -> str | None:
    """An object's text, None when absent."""
    s3 = client(endpoint)
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return None
