"""fsspec filesystems for URLs: built with the project's client options, cached per process, settings and env.

Credentials come from the standard places only (botocore's chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_PROFILE or `storage.profile`, ~/.aws, instance/container role); nothing here receives, stores or logs a secret.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import fsspec

from pipeline.storage.errors import StorageError
from pipeline.storage.paths import GCS_PROTOCOLS, S3_PROTOCOLS, is_remote, s3_endpoint, s3_region, url_protocol
from pipeline.storage.settings import StorageConfig

logger = logging.getLogger(__name__)

# Environment variables that change which endpoint/credentials a client uses. Their values are hashed into the
# filesystem cache key (never logged) so that changing the environment in-process takes effect.
_CLIENT_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)

# One filesystem per (process, protocol, storage settings, client environment). The pid is part of the key because
# s3fs/aiobotocore sessions (an event loop thread and open sockets) do not survive fork: a forked child builds
# its own. The parent's instances are left untouched in the child (closing them there could disturb sockets that
# the parent still uses).
_cache: dict[tuple[object, ...], fsspec.AbstractFileSystem] = {}
S3FS_ATTEMPTS = 1  # s3fs's own attempts per call (its class default: 5)
_cache_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _cache_lock
    _cache_lock = threading.Lock()  # the parent's lock may have been held by another thread at fork time


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _env_fingerprint() -> str:
    joined = "\0".join(os.environ.get(name, "") for name in _CLIENT_ENV)
    return hashlib.sha256(joined.encode()).hexdigest()


def s3_options(storage: StorageConfig) -> dict[str, object]:
    """Keyword arguments of the project's s3fs filesystems: endpoint and region from `s3_endpoint`/`s3_region`,
    botocore's retries off (`pipeline.storage.retries` retries and logs), fresh listings. Timeouts are s3fs's:
    5 s to connect, 15 s without a byte read (a stalled store fails an attempt after 15 s)."""
    client_kwargs: dict[str, str] = {}
    config_kwargs: dict[str, object] = {"retries": {"total_max_attempts": 1}}
    endpoint = s3_endpoint(storage)
    region = s3_region(storage)
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        # S3-compatible servers (SeaweedFS, MinIO, Ceph) are addressed by path, not by bucket DNS names.
        config_kwargs["s3"] = {"addressing_style": "path"}
    if region:
        client_kwargs["region_name"] = region
    kwargs: dict[str, object] = {
        "anon": storage.anonymous,
        "client_kwargs": client_kwargs,
        "config_kwargs": config_kwargs,
        # Listings must be fresh: checkpoints and shards are written by other processes.
        "use_listings_cache": False,
    }
    if storage.profile:
        kwargs["profile"] = storage.profile
    return kwargs


def _new_filesystem(url: str, protocol: str, storage: StorageConfig) -> fsspec.AbstractFileSystem:
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: cannot use {protocol}:// URLs: {exc}") from exc
    kwargs: dict[str, object] = {}
    if protocol in S3_PROTOCOLS:
        kwargs = s3_options(storage)
    elif protocol in GCS_PROTOCOLS:
        kwargs = {"use_listings_cache": False}
        if storage.anonymous:
            kwargs["token"] = "anon"
    # Our cache replaces fsspec's: its key ignores the environment that botocore reads credentials from.
    fs = cls(skip_instance_cache=True, **kwargs)
    if protocol in S3_PROTOCOLS:
        # One attempt per call (s3fs's default is 5, each up to its 15 s read timeout, silently): a stalled or
        # unreachable store surfaces in `pipeline.storage.retries`, which retries, logs and owns the budget.
        fs.retries = S3FS_ATTEMPTS
    return fs


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it.

    Instances are cached per (process, protocol, storage settings, credential/endpoint environment): cheap to call per
    operation, safe to use after fork (a child builds its own), and thread-safe.
    """
    if "::" in url:
        raise StorageError(f"{url}: chained fsspec URLs (a::b) are not supported; pass a single URL")
    storage = storage or StorageConfig()
    protocol = url_protocol(url)
    key = (os.getpid(), protocol, storage.model_dump_json(), _env_fingerprint() if is_remote(protocol) else "")
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _new_filesystem(url, protocol, storage)
            _cache[key] = fs
            if protocol in S3_PROTOCOLS:
                logger.debug("s3 filesystem for endpoint %s", s3_endpoint(storage) or "AWS default")
    return fs, fs._strip_protocol(url)
