"""The project's one retry helper (on tenacity), and the storage policy built on it: retry transient errors only.

`retry_call` is the mechanism: which exceptions to retry, how long to wait, when to give up. `with_retries` is the
storage policy every storage call uses: `storage.retries` retries after the first attempt, exponential backoff from
`storage.retry_backoff_s` (capped at 30 s, jittered), each retry logged at WARNING; auth, missing and other
permanent failures raise at once; programming errors propagate unchanged.

Retry layers: botocore's own retries are switched off (`pipeline.storage.filesystems`) so transient errors surface
here, where they are counted and logged. s3fs keeps its short internal retry (about 1 s), which protects reads in
the middle of a stream; a stream that must survive a longer outage re-opens (`pipeline.storage.streams`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TypeVar

import tenacity

from pipeline.config import StorageConfig
from pipeline.storage.errors import StorageError, as_storage_error, classify, describe, is_storage_failure
from pipeline.storage.paths import is_remote

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BACKOFF_S = 30.0  # cap of one wait between attempts; the budget itself is storage.retries


def retry_call(
    fn: Callable[[], T],
    *,
    retry_if: Callable[[BaseException], bool],
    wait_s: Callable[[int], float],
    attempts: int | None = None,
    within_s: float | None = None,
    before_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call `fn` until it returns. An exception `retry_if` accepts is retried after `wait_s(n)` seconds (n: the
    number of the failed attempt, from 1) until `attempts` calls were made or `within_s` seconds have passed since
    the first; then, and for any exception `retry_if` refuses, the exception propagates as it is.
    `before_retry(n, exception, wait)` runs before each wait (for logging or resetting state)."""
    stops = [tenacity.stop_after_attempt(attempts)] if attempts is not None else []
    stops += [tenacity.stop_after_delay(within_s)] if within_s is not None else []
    if not stops:
        raise ValueError("retry_call needs attempts or within_s (it never retries forever)")

    def notify(state: tenacity.RetryCallState) -> None:
        if before_retry is not None and state.outcome is not None and state.next_action is not None:
            before_retry(state.attempt_number, state.outcome.exception(), state.next_action.sleep)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_any(*stops),
        wait=lambda state: wait_s(state.attempt_number),
        retry=tenacity.retry_if_exception(retry_if),
        before_sleep=notify,
        reraise=True,
    )
    return retrying(fn)


def backoff_s(base_s: float, attempt: int) -> float:
    """The wait after failed attempt `attempt` (from 1): `base_s` doubled per attempt, capped, times a jitter in
    [0.5, 1] so that many clients failing together do not retry in lockstep."""
    return min(MAX_BACKOFF_S, base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def with_retries(
    fn: Callable[[], T], *, what: str, storage: StorageConfig | None = None, protocol: str | None = None
) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff (each retry logged at WARNING).

    Transient: connection refused/reset, timeouts, HTTP 5xx/429, SlowDown. Other storage failures (missing object,
    403, bad or missing credentials) raise at once: `StorageAuthError` for credentials, `StorageError` otherwise,
    with `what` (say "read s3://bucket/key") in the message. Budget: `storage.retries` retries after the first.
    `protocol` (of the URL, when known) sharpens the credential hint. A `StorageError` from an inner call is never
    retried again. Exceptions that are not I/O or storage-client errors (a TypeError from a bug) propagate unchanged.
    """
    storage = storage or StorageConfig()
    attempts = storage.retries + 1
    remote = None if protocol is None else is_remote(protocol)

    def transient(exc: BaseException) -> bool:
        return not isinstance(exc, StorageError) and is_storage_failure(exc) and classify(exc, remote) == "transient"

    def log_retry(attempt: int, exc: BaseException, wait: float) -> None:
        logger.warning(
            "%s failed (attempt %d/%d, transient): %s; retrying in %.2f s", what, attempt, attempts, describe(exc), wait
        )

    try:
        return retry_call(
            fn,
            retry_if=transient,
            wait_s=lambda attempt: backoff_s(storage.retry_backoff_s, attempt),
            attempts=attempts,
            before_retry=log_retry,
        )
    except StorageError:
        raise  # already classified by an inner call
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        raise as_storage_error(exc, what, attempts=attempts, protocol=protocol, storage=storage) from exc
