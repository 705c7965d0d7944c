"""An S3 bucket prefix as patcher uses it: locations Triton reads, verified uploads, copies, listings, a writer lock.

    s3://BUCKET/PREFIX                         AWS (region and credentials from the environment, as boto3 and
                                               Triton read them: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)
    s3://http://HOST:PORT/BUCKET/PREFIX        any S3-compatible endpoint (Triton's form; path-style addressing)

Every upload is verified after it lands: the object's size, and its MD5 (the ETag of a single-part upload), else the
SHA-256 the store computed (ChecksumSHA256), else the bytes read back. boto3 is imported only here (extra `s3`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patcher.base.errors import PatcherError

# What Triton 2.51's S3 filesystem accepts (its s3:// regular expression): bucket, then path parts.
BUCKET = re.compile(r"[0-9a-z.\-]+")
PART = re.compile(r"[0-9a-zA-Z.\-_]+")
ENDPOINT = re.compile(r"(https?)://([0-9a-zA-Z\-.]+):([0-9]+)")
MD5_ETAG = re.compile(r'"?([0-9a-f]{32})"?')
LOCK_STALE_S = 3600.0  # a lock older than this, or whose process on this host is gone, was left by a killed writer
INSTALL = "install boto3 (`pip install 'patcher[s3]'`) to use object stores"


@dataclass(frozen=True)
class Location:
    """A bucket prefix: endpoint (None: AWS), bucket, and key prefix ("" or ending in "/")."""

    endpoint: str | None
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        """The location as Triton's --model-repository takes it."""
        path = f"{self.bucket}/{self.prefix}".rstrip("/")
        return f"s3://{self.endpoint}/{path}" if self.endpoint else f"s3://{path}"

    def url(self, relative: str = "") -> str:
        """s3://... of one object or folder, for messages."""
        return f"{self.uri}/{relative}" if relative else self.uri


def parse_location(uri: str) -> Location:
    """An s3:// location; PatcherError for other schemes and for names Triton cannot read."""
    if uri.startswith(("gs://", "as://")):
        raise PatcherError(f"{uri}: patcher writes s3:// (AWS or any S3-compatible endpoint); for Google Cloud "
                           "Storage use its S3 endpoint, s3://https://storage.googleapis.com:443/BUCKET/PREFIX with "
                           "HMAC keys; for Azure, a folder synced with azcopy")
    if not uri.startswith("s3://"):
        raise PatcherError(f"{uri} is not an s3:// location (s3:// written as a path loses its '//': quote it)")
    rest, endpoint = uri.removeprefix("s3://"), None
    match = re.match(r"(https?://[^/]+)/(.*)", rest)
    if match:
        if not ENDPOINT.fullmatch(match.group(1)):
            raise PatcherError(f"{uri}: an endpoint must read http://HOST:PORT or https://HOST:PORT (Triton's form)")
        endpoint, rest = match.group(1), match.group(2)
    bucket, _, prefix = rest.partition("/")
    parts = [part for part in prefix.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise PatcherError(f"{uri}: a prefix may not hold '.' or '..' (keys would be written outside it): name the "
                           "folder itself")
    if not BUCKET.fullmatch(bucket) or not all(PART.fullmatch(part) for part in parts):
        raise PatcherError(f"{uri}: Triton reads buckets of a-z, 0-9, '.', '-' and paths of letters, digits, '.', "
                           "'-', '_': rename it")
    return Location(endpoint, bucket, "".join(f"{part}/" for part in parts))


@dataclass(frozen=True)
class Digest:
    """What an object must be: its size, SHA-256 (hex) and MD5 (hex)."""

    size: int
    sha256: str
    md5: str

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The digest of some bytes."""
        return cls(len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest())

    @classmethod
    def of_file(cls, path: Path) -> Digest:
        """The digest of a file, read once."""
        sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        return cls(size, sha.hexdigest(), md5.hexdigest())


class Bucket:
    """Object operations on one location, keys relative to its prefix; store errors become one-line PatcherErrors."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self._client: Any = None

    @property
    def client(self) -> Any:
        """A boto3 S3 client of the location's endpoint (path-style addressing for custom endpoints)."""
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise PatcherError(f"{self.location.uri}: {INSTALL}") from None
            style = {"s3": {"addressing_style": "path"}} if self.location.endpoint else {}
            config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                            **style)
            self._client = boto3.client("s3", endpoint_url=self.location.endpoint, config=config)
        return self._client

    def key(self, relative: str) -> str:
        """The full key of a relative name."""
        return self.location.prefix + relative

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn botocore's errors raised in the block into one PatcherError naming the location and what failed."""
        try:
            yield
        except PatcherError:
            raise
        except Exception as error:
            module = type(error).__module__
            if not module.startswith(("botocore", "boto3", "urllib3")):
                raise
            raise PatcherError(f"{doing} {self.location.uri} failed: {_reason(error)}") from None

    def check(self) -> None:
        """PatcherError unless the bucket exists and can be read with these credentials."""
        try:
            with self.errors("reading"):
                self.client.head_bucket(Bucket=self.location.bucket)
        except PatcherError as error:
            if "404" not in str(error):
                raise
            raise PatcherError(f"bucket {self.location.bucket} does not exist at "
                               f"{self.location.endpoint or 'AWS'}: create it first") from None

    def put(self, relative: str, data: bytes | Path, metadata: dict[str, str] | None = None) -> Digest:
        """Upload bytes or a file to `relative` and verify it landed whole; its digest."""
        digest = Digest.of(data) if isinstance(data, bytes) else Digest.of_file(data)
        checksum = base64.b64encode(bytes.fromhex(digest.sha256)).decode()
        with self.errors(f"uploading {relative} to"), _body(data) as body:
            self.client.put_object(Bucket=self.location.bucket, Key=self.key(relative), Body=body,
                                   ContentLength=digest.size, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                                   Metadata={"sha256": digest.sha256, **(metadata or {})})
        self.verify(relative, digest)
        return digest

    def verify(self, relative: str, digest: Digest) -> None:
        """PatcherError unless the object has the digest's size and content (MD5 ETag, store SHA-256 or read back)."""
        with self.errors(f"checking {relative} in"):
            head = self.client.head_object(Bucket=self.location.bucket, Key=self.key(relative), ChecksumMode="ENABLED")
            if head["ContentLength"] != digest.size:
                raise PatcherError(f"{self.location.url(relative)} holds {head['ContentLength']} bytes, not the "
                                   f"{digest.size} uploaded: the upload did not land whole, run again")
            md5 = MD5_ETAG.fullmatch(head.get("ETag", ""))
            if md5:
                same = md5.group(1) == digest.md5
            elif head.get("ChecksumSHA256") and "-" not in head["ChecksumSHA256"]:
                same = base64.b64decode(head["ChecksumSHA256"]).hex() == digest.sha256
            else:
                body = self.client.get_object(Bucket=self.location.bucket, Key=self.key(relative))["Body"].read()
                same = hashlib.sha256(body).hexdigest() == digest.sha256
        if not same:
            raise PatcherError(f"{self.location.url(relative)} does not hold the bytes uploaded (hash differs): "
                               "run again")

    def copy(self, source: str, target: str, digest: Digest) -> None:
        """Server-side copy of one object, verified like an upload."""
        with self.errors(f"copying {source} to {target} in"):
            self.client.copy_object(Bucket=self.location.bucket, Key=self.key(target), MetadataDirective="COPY",
                                    CopySource={"Bucket": self.location.bucket, "Key": self.key(source)})
        self.verify(target, digest)

    def get(self, relative: str) -> bytes | None:
        """An object's bytes, None when there is none."""
        with self.errors(f"reading {relative} from"):
            try:
                response = self.client.get_object(Bucket=self.location.bucket, Key=self.key(relative))
            except self.client.exceptions.NoSuchKey:
                return None
            return bytes(response["Body"].read())

    def get_json(self, relative: str) -> dict[str, Any] | None:
        """An object's JSON, None when there is none; PatcherError when it is not JSON."""
        data = self.get(relative)
        if data is None:
            return None
        try:
            return dict(json.loads(data))
        except (ValueError, TypeError):
            raise PatcherError(f"{self.location.url(relative)} is not readable JSON: remove it if no `patcher "
                               "triton` is writing") from None

    def listing(self, relative: str = "") -> dict[str, dict[str, Any]]:
        """Every object under `relative` (a folder, "" for the whole location): relative key -> size, etag."""
        found = {}
        with self.errors("listing"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket,
                                                                          Prefix=self.key(relative))
            for page in pages:
                for item in page.get("Contents", []):
                    found[item["Key"].removeprefix(self.location.prefix)] = {"size": item["Size"],
                                                                             "etag": item.get("ETag", "")}
        return found

    def delete(self, keys: list[str]) -> None:
        """Delete objects (relative keys), a thousand a request."""
        with self.errors("deleting from"):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self.key(k)} for k in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_folder(self, relative: str) -> int:
        """Delete every object under a folder; how many there were."""
        keys = list(self.listing(relative))
        self.delete(keys)
        return len(keys)

    @contextlib.contextmanager
    def lock(self, relative: str) -> Iterator[None]:
        """An exclusive lock object, created only if absent (If-None-Match); a stale one (its process gone from this
        host, or older than LOCK_STALE_S) is taken over. PatcherError when a live writer holds it."""
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for attempt in range(2):
            try:
                with self.errors("locking"):
                    self.client.put_object(Bucket=self.location.bucket, Key=self.key(relative), IfNoneMatch="*",
                                           Body=json.dumps(holder).encode())
                break
            except PatcherError as error:
                if "PreconditionFailed" not in str(error) and "ConditionalRequestConflict" not in str(error):
                    raise
                other = self.get_json(relative) or {}
                if attempt or not _stale(other):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("time", 0))))
                    raise PatcherError(f"{self.location.uri} is being written by pid {other.get('pid')} on "
                                       f"{other.get('host')} since {since}: wait for it, or, if it is not running, "
                                       f"delete {self.location.url(relative)}") from None
                self.delete([relative])
        try:
            yield
        finally:
            with contextlib.suppress(PatcherError):
                self.delete([relative])


def _stale(holder: dict[str, Any]) -> bool:
    if time.time() - float(holder.get("time", 0)) > LOCK_STALE_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


@contextlib.contextmanager
def _body(data: bytes | Path) -> Iterator[Any]:
    if isinstance(data, bytes):
        yield data
        return
    with open(data, "rb") as handle:
        yield handle


def _reason(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code, message = response["Error"].get("Code", ""), response["Error"].get("Message", "")
        hints = {"NoSuchBucket": "create the bucket first", "AccessDenied": "check the credentials' permissions",
                 "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID", "SignatureDoesNotMatch": "check the secret key"}
        return f"{code}: {message}".strip(": ") + (f" ({hints[code]})" if code in hints else "")
    name = type(error).__name__
    if name == "NoCredentialsError":
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile), as Triton reads them"
    return f"{name}: {error}"
