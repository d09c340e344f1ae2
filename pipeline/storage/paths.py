"""Pure URL and path helpers, and the one resolver of the S3 endpoint and region every client uses.

Nothing here touches storage: these functions only read strings (and, for the S3 settings, the environment).
"""

from __future__ import annotations

import os

import fsspec

from pipeline.storage.settings import StorageConfig

S3_PROTOCOLS = frozenset({"s3", "s3a"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})


def url_protocol(url: str) -> str:
    """The fsspec protocol of `url`: "s3", "gs", ...; "file" for plain paths."""
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol or "file"


def is_remote(protocol: str) -> bool:
    """Whether `protocol` names an object store or other remote filesystem (not this machine's disk)."""
    return protocol not in ("file", "local")


def join_url(base: str, *parts: str) -> str:
    """Join path segments onto a URL or local path with '/': join_url("s3://b", "run", "x") == "s3://b/run/x".

    Leading/trailing slashes of `parts` are dropped and empty parts skipped; the scheme and authority of `base`
    (s3://bucket, gs://bucket, file:///) are kept as given.
    """
    out = base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = part if not out else (out + part if out.endswith("/") else f"{out}/{part}")
    return out


def is_local_url(url: str) -> bool:
    """Whether `url` names this machine's file system: a plain path or a file:// URL (the one test the project
    uses; a local run directory gets TensorBoard files written in place, a remote one does not)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The file-system path of a local `url` (file:// removed)."""
    return url.removeprefix("file://")


def absolute_url(url: str) -> str:
    """`url` with a local path made absolute (and `~` expanded); remote URLs unchanged.

    Ray workers run in their own working directories, so a relative path given on the submitting machine must be
    resolved there, before it is shipped to them.
    """
    if url.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def s3_endpoint(storage: StorageConfig) -> str | None:
    """The S3 endpoint every client of the project uses (the pipeline's s3fs and Ray Train's storage): the config,
    then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, as botocore orders them; None is AWS itself."""
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region(storage: StorageConfig) -> str | None:
    """The S3 region: the config, then AWS_REGION, then AWS_DEFAULT_REGION; None leaves it to the client."""
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
