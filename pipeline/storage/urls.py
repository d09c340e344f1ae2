"""Storage URLs (s3://, gs://, file://, plain paths, any fsspec protocol) for every layer above.

Contract:
- Credentials come from the standard places only (botocore's chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
  AWS_PROFILE or `storage.profile`, ~/.aws, instance/container role). This module never receives, stores, logs or
  formats a secret; error messages name the credential *source* to check.
- Writes are atomic: a reader sees the old object or the new one, never a prefix of the new one.
- Transient failures (connection refused/reset, timeouts, 5xx, SlowDown) are retried with exponential backoff
  (`storage.retries`, `storage.retry_backoff_s`) and each retry is logged; permanent ones (missing object, denied,
  bad credentials) raise `StorageError` at once, naming the URL and the cause.

Retry layers: botocore's own retries are switched off so transient errors surface here, where they are counted
and logged. s3fs keeps its short internal retry (about 1 s) because it is what protects reads in the middle of an
`open_read` stream; only the *open* of a stream is retried here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

S3_PROTOCOLS = frozenset({"s3", "s3a"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})
_MAX_BACKOFF_S = 30.0  # cap of one sleep between attempts; the budget itself is storage.retries
_TEMP_SUFFIX = ".partial"
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(_TEMP_SUFFIX) + "$")

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
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageError(OSError):
    """A storage operation failed for good: the message names the URL (or operation) and the cause.

    `errno` is ENOENT when the object does not exist, so callers can tell "missing" from "broken".
    """

    def __init__(self, message: str, *, errno_code: int | None = None) -> None:
        super().__init__(message)
        if errno_code is not None:
            self.errno = errno_code

    def __reduce__(self) -> tuple[object, ...]:  # keep errno across pickling (Ray, DataLoader workers)
        return (type(self), self.args, {"errno": self.errno})


class StorageAuthError(StorageError):
    """Credentials are missing, wrong or not allowed; the message says which credential source to check."""


# --------------------------------------------------------------------------------------------------- filesystems

# One filesystem per (process, protocol, storage settings, client environment). The pid is part of the key because
# s3fs/aiobotocore sessions (an event loop thread and open sockets) do not survive fork: a forked child builds
# its own. The parent's instances are left untouched in the child (closing them there could disturb sockets that
# the parent still uses).
_cache: dict[tuple[object, ...], fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _cache_lock
    _cache_lock = threading.Lock()  # the parent's lock may have been held by another thread at fork time


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def _protocol(url: str) -> str:
    if "::" in url:
        raise StorageError(f"{url}: chained fsspec URLs (a::b) are not supported; pass a single URL")
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol or "file"


def _is_remote(protocol: str) -> bool:
    return protocol not in ("file", "local")


def _env_fingerprint() -> str:
    joined = "\0".join(os.environ.get(name, "") for name in _CLIENT_ENV)
    return hashlib.sha256(joined.encode()).hexdigest()


def s3_endpoint(storage: StorageConfig) -> str | None:
    """The S3 endpoint every client of the project uses (the pipeline's s3fs and Ray Train's storage): the config,
    then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, as botocore orders them; None is AWS itself."""
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region(storage: StorageConfig) -> str | None:
    """The S3 region: the config, then AWS_REGION, then AWS_DEFAULT_REGION; None leaves it to the client."""
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _s3_kwargs(storage: StorageConfig) -> dict[str, object]:
    client_kwargs: dict[str, str] = {}
    config_kwargs: dict[str, object] = {"retries": {"total_max_attempts": 1}}  # retried (and logged) here
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
        kwargs = _s3_kwargs(storage)
    elif protocol in GCS_PROTOCOLS:
        kwargs = {"use_listings_cache": False}
        if storage.anonymous:
            kwargs["token"] = "anon"
    # Our cache replaces fsspec's: its key ignores the environment that botocore reads credentials from.
    return cls(skip_instance_cache=True, **kwargs)


def _resolve(url: str, storage: StorageConfig | None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    fs, path = filesystem(url, storage)
    return fs, path, _protocol(url)


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it.

    Instances are cached per (process, protocol, storage settings, credential/endpoint environment): cheap to call per
    operation, safe to use after fork (a child builds its own), and thread-safe.
    """
    storage = storage or StorageConfig()
    protocol = _protocol(url)
    remote = _is_remote(protocol)
    key = (os.getpid(), protocol, storage.model_dump_json(), _env_fingerprint() if remote else "")
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _new_filesystem(url, protocol, storage)
            _cache[key] = fs
            if protocol in S3_PROTOCOLS:
                logger.debug("s3 filesystem for endpoint %s", s3_endpoint(storage) or "AWS default")
    return fs, fs._strip_protocol(url)


# ------------------------------------------------------------------------------------------------------ retries

_Kind = Literal["transient", "auth", "missing", "permanent"]

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "401",
        "403",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


def _botocore_kind(exc: BaseException) -> _Kind | None:
    try:
        from botocore import exceptions as bex
    except ImportError:  # no S3 support installed: nothing to classify
        return None
    if isinstance(
        exc,
        bex.NoCredentialsError
        | bex.PartialCredentialsError
        | bex.CredentialRetrievalError
        | bex.ProfileNotFound
        | bex.TokenRetrievalError,
    ):
        return "auth"
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _AUTH_CODES or status in (401, 403):
            return "auth"
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return "transient"
        if code in _MISSING_CODES or status == 404:
            return "missing"
        return "permanent"
    if isinstance(exc, bex.HTTPClientError | bex.ConnectionError | bex.ResponseStreamingError):
        return "transient"  # endpoint unreachable, connection closed, read/connect timeout
    return None


def _aiohttp_kind(exc: BaseException) -> _Kind | None:
    try:
        import aiohttp
    except ImportError:
        return None
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return "transient"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its explicit causes (s3fs and botocore chain translated errors with `raise ... from`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec")


def _is_storage_failure(exc: BaseException) -> bool:
    """True for I/O and storage-client errors; False for programming errors (TypeError...), which propagate as is."""
    return any(
        isinstance(link, OSError) or type(link).__module__.split(".")[0] in _CLIENT_MODULES for link in _chain(exc)
    )


def _classify(exc: BaseException, remote: bool | None) -> _Kind:
    """What an exception means for retrying; `remote` is None when the protocol is unknown."""
    from fsspec.exceptions import FSTimeoutError

    for link in _chain(exc):
        kind = _botocore_kind(link) or _aiohttp_kind(link)
        if kind is not None:
            return kind
        if isinstance(link, ConnectionError | TimeoutError | FSTimeoutError):
            return "transient"
        if isinstance(link, FileNotFoundError):
            return "missing"
        if isinstance(link, PermissionError):
            return "auth" if remote is not False else "permanent"
        if isinstance(link, OSError) and link.errno in (errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT):
            return "transient"  # s3fs's translation of SlowDown/503 and InternalError/500
    return "permanent"


def _redact(text: str) -> str:
    """Defence in depth: a secret from the environment never reaches a message or a log line."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return _redact(f"{type(exc).__name__}: {text}")


def _credential_hint(protocol: str | None, storage: StorageConfig) -> str:
    """Which credential source to check (never its value)."""
    if protocol in GCS_PROTOCOLS:
        return "check GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`"
    if protocol is not None and protocol not in S3_PROTOCOLS:
        return f"check the credentials of the {protocol}:// filesystem" if _is_remote(protocol) else "check permissions"
    if storage.anonymous:
        source = "storage.anonymous=true, which sends unsigned requests (set it false, or make the data public)"
    elif storage.profile:
        source = f"the AWS profile '{storage.profile}' (storage.profile) in ~/.aws/credentials or ~/.aws/config"
    elif os.environ.get("AWS_ACCESS_KEY_ID"):
        source = "the environment variables AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
    elif os.environ.get("AWS_PROFILE"):
        source = f"the AWS profile '{os.environ['AWS_PROFILE']}' named by AWS_PROFILE, in ~/.aws/credentials"
    else:
        source = (
            "botocore's default chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the [default] profile in "
            "~/.aws/credentials, or the instance/container role"
        )
    hint = f"check {source}; endpoint {s3_endpoint(storage) or 'AWS default'}"
    return hint if protocol is not None else hint + " (for a local path: its file permissions)"


def _retrying(fn: Callable[[], T], what: str, storage: StorageConfig | None, protocol: str | None) -> T:
    storage = storage or StorageConfig()
    attempts = storage.retries + 1
    remote = None if protocol is None else _is_remote(protocol)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise  # already classified by an inner call: never retry twice
        except Exception as exc:
            if not _is_storage_failure(exc):
                raise
            kind = _classify(exc, remote)
            cause = _describe(exc)
            if kind == "transient" and attempt < attempts:
                delay = min(_MAX_BACKOFF_S, storage.retry_backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                logger.warning(
                    "%s failed (attempt %d/%d, transient): %s; retrying in %.2f s",
                    what, attempt, attempts, cause, delay,
                )
                time.sleep(delay)
                continue
            if kind == "auth":
                hint = _credential_hint(protocol, storage)
                raise StorageAuthError(f"{what}: access denied ({cause}); {hint}") from exc
            if kind == "missing":
                raise StorageError(f"{what}: not found ({cause})", errno_code=errno.ENOENT) from exc
            if kind == "transient":
                raise StorageError(f"{what}: still failing after {attempts} attempts: {cause}") from exc
            raise StorageError(f"{what}: {cause}") from exc
    raise AssertionError("unreachable")


def with_retries(fn: Callable[[], T], *, what: str, storage: StorageConfig | None = None) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff (each retry logged at WARNING).

    Transient: connection refused/reset, timeouts, HTTP 5xx/429, SlowDown. Other storage failures (missing object,
    403, bad or missing credentials) raise at once: `StorageAuthError` for credentials, `StorageError` otherwise,
    with `what` (say "read s3://bucket/key") in the message. Budget: `storage.retries` retries after the first.
    Exceptions that are not I/O or storage-client errors (a TypeError from a bug) propagate unchanged.
    """
    return _retrying(fn, what, storage, None)


# ------------------------------------------------------------------------------------------------------- reading


def open_read(url: str, storage: StorageConfig | None = None) -> BinaryIO:
    """Open `url` for streaming reads; the caller closes it.

    Opening is retried on transient errors (a missing object fails here, not at the first read). Reads in the
    middle of the stream rely on the filesystem's own short retry; a caller that must survive a long outage
    mid-stream re-opens and seeks.
    """
    fs, path, protocol = _resolve(url, storage)
    return _retrying(lambda: fs.open(path, "rb"), f"open {url}", storage, protocol)


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    """The whole object at `url`, retried on transient errors."""
    fs, path, protocol = _resolve(url, storage)
    return _retrying(lambda: fs.cat_file(path), f"read {url}", storage, protocol)


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    """Whether an object or a non-empty directory/prefix exists at `url` (denied access raises, not False)."""
    fs, path, protocol = _resolve(url, storage)
    return _retrying(lambda: bool(fs.exists(path)), f"check {url}", storage, protocol)


def list_dir(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URLs of the direct children of `url`, sorted, in the same spelling as `url`; [] if it is missing.

    Temporary files of in-flight local atomic writes are not listed.
    """
    fs, path, protocol = _resolve(url, storage)

    def _list() -> list[str]:
        try:
            names = fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = path.rstrip("/")
        children = {posixpath.basename(str(name).rstrip("/")) for name in names if str(name).rstrip("/") != base}
        return sorted(join_url(url, child) for child in children if child and not _TEMP_NAME.match(child))

    return _retrying(_list, f"list {url}", storage, protocol)


# ------------------------------------------------------------------------------------------------------- writing


def _local_atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers see old or new, never partial."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}")
    try:
        # O_EXCL + mode 0o666: a fresh file with the usual umask-derived permissions (mkstemp would force 0600).
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Publish `data` at `url` atomically (readers see the old object or the new one), retried on transient errors.

    Local files: temp file + os.replace. Object stores: a single PUT, or for large payloads a multipart upload,
    is atomic by the S3/GCS contract: the key appears only when the PUT or the multipart completion succeeds, so
    nothing is ever written under the final key in pieces.
    """
    fs, path, protocol = _resolve(url, storage)
    if isinstance(fs, LocalFileSystem):
        action: Callable[[], None] = lambda: _local_atomic_write(path, lambda handle: handle.write(data))  # noqa: E731
    else:
        action = lambda: fs.pipe_file(path, data)  # noqa: E731
    _retrying(action, f"write {url}", storage, protocol)


def upload_file(local_path: str, url: str, storage: StorageConfig | None = None) -> None:
    """Copy the local file `local_path` to `url` atomically, streaming (for checkpoints and shards).

    Object stores: one PUT below s3fs's multipart threshold, a multipart upload above it; either way the key
    appears only on completion (an aborted multipart upload leaves no object).
    """
    fs, path, protocol = _resolve(url, storage)
    if isinstance(fs, LocalFileSystem):

        def action() -> None:
            with open(local_path, "rb") as source:
                _local_atomic_write(path, lambda handle: _copy(source, handle))

    else:

        def action() -> None:
            if not os.path.isfile(local_path):
                raise FileNotFoundError(errno.ENOENT, "no such local file", local_path)
            fs.put_file(local_path, path)

    _retrying(action, f"upload {local_path} to {url}", storage, protocol)


def _copy(source: BinaryIO, target: BinaryIO, chunk: int = 8 << 20) -> None:
    while block := source.read(chunk):
        target.write(block)


def remove(url: str, storage: StorageConfig | None = None, recursive: bool = False) -> None:
    """Delete the object (or, with recursive=True, everything under the prefix/directory) at `url`.

    A missing `url` is not an error, so clean-ups can be repeated.
    """
    fs, path, protocol = _resolve(url, storage)

    def _remove() -> None:
        folders = _s3_folders(fs, path) if recursive and protocol in S3_PROTOCOLS else []
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)
        _delete_s3_folder_entries(fs, folders)

    _retrying(_remove, f"remove {url}", storage, protocol)


def _s3_folders(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        found = fs.find(path, withdirs=True, detail=True)
    except FileNotFoundError:
        return []
    return [name for name, info in found.items() if info.get("type") == "directory" and "/" in name]


def _delete_s3_folder_entries(fs: fsspec.AbstractFileSystem, folders: list[str]) -> None:
    """Delete the 'dir/' keys of folders just emptied, deepest first.

    SeaweedFS keeps real directory entries, listed as prefixes for ~30 s after their last object is gone, which
    makes a removed prefix look present to list_dir/exists. Deleting the 'dir/' key drops an empty one at once
    (a non-empty one is kept); on AWS S3 it deletes at most a zero-byte folder marker, so it is safe everywhere.
    """
    keys_by_bucket: dict[str, list[str]] = {}
    for folder in folders:
        bucket, key = folder.split("/", 1)
        keys_by_bucket.setdefault(bucket, []).append(key.rstrip("/") + "/")
    for bucket, keys in keys_by_bucket.items():
        keys.sort(key=lambda key: key.count("/"), reverse=True)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


# --------------------------------------------------------------------------------------------------------- paths


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
