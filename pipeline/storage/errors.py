"""What a storage failure means: the StorageError types, classification of client exceptions, and safe messages.

Classification decides retrying: "transient" (connection refused/reset, timeouts, HTTP 5xx/429, SlowDown),
"auth" (denied, bad or missing credentials), "missing" (no such object) or "permanent". Messages name the URL and
the credential *source* to check, never a secret: values of secret environment variables are redacted.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Literal

from pipeline.storage.paths import GCS_PROTOCOLS, S3_PROTOCOLS, is_remote, s3_endpoint
from pipeline.storage.settings import StorageConfig

ErrorKind = Literal["transient", "auth", "missing", "permanent"]

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec")
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


def _botocore_kind(exc: BaseException) -> ErrorKind | None:
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


def _aiohttp_kind(exc: BaseException) -> ErrorKind | None:
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


def is_storage_failure(exc: BaseException) -> bool:
    """True for I/O and storage-client errors; False for programming errors (TypeError...), which propagate as is."""
    return any(
        isinstance(link, OSError) or type(link).__module__.split(".")[0] in _CLIENT_MODULES for link in _chain(exc)
    )


def classify(exc: BaseException, remote: bool | None) -> ErrorKind:
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


def redact(text: str) -> str:
    """Defence in depth: a secret from the environment never reaches a message or a log line."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def describe(exc: BaseException) -> str:
    """"Type: message" of `exc`, redacted: the cause as messages and log lines show it."""
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}")


def credential_hint(protocol: str | None, storage: StorageConfig) -> str:
    """Which credential source to check (never its value); `protocol` None when the URL is unknown."""
    if protocol in GCS_PROTOCOLS:
        return "check GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`"
    if protocol is not None and protocol not in S3_PROTOCOLS:
        return f"check the credentials of the {protocol}:// filesystem" if is_remote(protocol) else "check permissions"
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


def as_storage_error(
    exc: BaseException, what: str, *, attempts: int, protocol: str | None, storage: StorageConfig,
    waited_s: float = 0.0, budget: str | None = None,
) -> StorageError:
    """The StorageError that the storage failure `exc` of `what` (say "read s3://b/k") means after `attempts`
    over `waited_s` seconds, within `budget` (the retry budget's setting, as text)."""
    kind = classify(exc, None if protocol is None else is_remote(protocol))
    cause = describe(exc)
    if kind == "auth":
        return StorageAuthError(f"{what}: access denied ({cause}); {credential_hint(protocol, storage)}")
    if kind == "missing":
        return StorageError(f"{what}: not found ({cause})", errno_code=errno.ENOENT)
    if kind == "transient":
        within = f" over {waited_s:.1f} s" + (f", retried for up to {budget}" if budget else "")
        return StorageError(f"{what}: still failing after {attempts} attempts{within}: {cause}")
    return StorageError(f"{what}: {cause}")


def gave_up_on_transient(exc: BaseException) -> bool:
    """Whether `exc` is a `StorageError` raised because a transient failure (the store unreachable or overloaded)
    outlasted its retries: the store may come back, so a whole idempotent operation may be tried again."""
    return isinstance(exc, StorageError) and exc.__cause__ is not None and classify(exc.__cause__, None) == "transient"
