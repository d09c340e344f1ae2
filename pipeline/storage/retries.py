"""The project's one retry helper (on tenacity), and the storage policy built on it: retry transient errors only.

`retry_call` is the mechanism: which exceptions to retry, how long to wait, when to give up. `with_retries` is the
storage policy every storage call uses. Transient errors (connection refused/reset, timeouts, HTTP 5xx/429) are
retried with exponential backoff from `storage.retry_backoff_s`, capped at `MAX_BACKOFF_S` and jittered, within one
of two budgets: `storage.retries` attempts after the first for one-off calls (start-up reads, listings, writes: a
wrong endpoint is reported within ~10 s), or `storage.outage_budget_s` seconds for reads on the data path
(`outage=True`: shard streams of training and the evaluator), which ride out an outage of the store. Either way
an outage is logged as two lines: one WARNING at the first failure ("storage unreachable (...): retrying for up to
..."), one INFO when a retry succeeds ("storage back after N s", N counted from that first failure); the attempts
between are DEBUG. After the budget a `StorageError` names the operation, the attempts, the time and the setting.
Auth, missing and other permanent failures raise at once; programming errors propagate unchanged.

`outlasting_outages` repeats a whole operation of several calls (a checkpoint save) while one of them gives up on
a transient failure. Its calls share one outage: the first failure of any of them is the WARNING line, and the
first call that succeeds after it gives the one "storage back after N s" line, N from that first failure (each call
timing only its own retries reported "back after 2.6 s" for a save that had failed for 34 s). They share one budget
too: the operation's deadline (its first failure + `storage.outage_budget_s`) reaches every call inside it through
a context variable, and no retry loop inside (a data-path read's, a nested operation's) waits past it, so budgets
compose: an operation around calls that retry on their own gives up at its deadline plus at most one backoff, not
at the sum of the budgets. (The context reaches the calls of the same thread; a DataLoader worker process or a
prefetch thread keeps its own budget.) On Ray, the job's
driver prints these lines from every worker; `pipeline.cluster.keep_fault_lines_whole` keeps Ray from holding them
back.

Retry layers: botocore's own retries and s3fs's internal ones are switched off (`pipeline.storage.filesystems`), so
every transient error surfaces here, where it is counted and logged; a stream that must survive an outage midway
re-opens at its offset (`pipeline.storage.streams`).
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from pipeline.storage.errors import (
    StorageError,
    as_storage_error,
    classify,
    describe,
    gave_up_on_transient,
    is_storage_failure,
)
from pipeline.storage.paths import is_remote
from pipeline.storage.settings import StorageConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BACKOFF_S = 10.0  # cap of one wait between attempts: a store that is back is noticed within 10 s


def retry_call(
    fn: Callable[[], T],
    *,
    retry_if: Callable[[BaseException], bool],
    wait_s: Callable[[int], float],
    attempts: int | None = None,
    within_s: float | None = None,
    before_retry: Callable[[int, BaseException, float], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> T:
    """Call `fn` until it returns. An exception `retry_if` accepts is retried after `wait_s(n)` seconds (n: the
    number of the failed attempt, from 1) until `attempts` calls were made, `within_s` seconds have passed since
    the first, or `until()` is true (a deadline that is not this loop's own); then, and for any exception
    `retry_if` refuses, the exception propagates as it is. `before_retry(n, exception, wait)` runs before each
    wait (for logging or resetting state)."""
    stops = [tenacity.stop_after_attempt(attempts)] if attempts is not None else []
    stops += [tenacity.stop_after_delay(within_s)] if within_s is not None else []
    if not stops:
        raise ValueError("retry_call needs attempts or within_s (it never retries forever)")
    if until is not None:
        stops.append(lambda state: until())

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
    fn: Callable[[], T], *, what: str, storage: StorageConfig | None = None, protocol: str | None = None,
    outage: bool = False, failed: BaseException | None = None,
) -> T:
    """Call `fn`, retrying transient storage errors with capped exponential backoff (see the module doc).

    Transient: connection refused/reset, timeouts, HTTP 5xx/429, SlowDown. Other storage failures (missing object,
    403, bad or missing credentials) raise at once: `StorageAuthError` for credentials, `StorageError` otherwise,
    with `what` (say "read s3://bucket/key") in the message. Budget: `storage.retries` retries after the first
    attempt, or with `outage` (reads on the data path) `storage.outage_budget_s` seconds. `failed`: the exception
    the caller's own first attempt raised (a stream's plain read); it counts as attempt 1. `protocol` (of the URL,
    when known) sharpens the credential hint. A `StorageError` from an inner call is never retried again.
    Exceptions that are not I/O or storage-client errors (a TypeError from a bug) propagate unchanged.
    """
    storage = storage or StorageConfig()
    remote = None if protocol is None else is_remote(protocol)
    outage_log = _OutageLog(what, storage, outage)
    operation = _operation.get()  # inside `outlasting_outages`: its deadline bounds these retries too

    def transient(exc: BaseException) -> bool:
        return not isinstance(exc, StorageError) and is_storage_failure(exc) and classify(exc, remote) == "transient"

    pending = [failed] if failed is not None else []

    def attempt() -> T:
        if pending:
            raise pending.pop()
        return fn()

    try:
        result = retry_call(
            attempt,
            retry_if=transient,
            wait_s=lambda n: backoff_s(storage.retry_backoff_s, n),
            attempts=None if outage else storage.retries + 1,
            within_s=storage.outage_budget_s if outage else None,
            before_retry=outage_log.retrying,
            until=None if operation is None else operation.expired,
        )
    except StorageError:
        raise  # already classified by an inner call
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        raise as_storage_error(exc, what, attempts=outage_log.attempts + 1, protocol=protocol, storage=storage,
                               waited_s=outage_log.waited_s(), budget=outage_log.budget) from exc
    outage_log.back()
    return result


def outlasting_outages(fn: Callable[[], T], *, what: str, storage: StorageConfig | None = None) -> T:
    """Call `fn`, an idempotent operation of several storage calls (a checkpoint's files, COMMIT last), again while
    one of its calls gives up on a transient failure, for up to `storage.outage_budget_s`: a save in the background
    then outlasts an outage of the store as the data path's reads do, instead of failing the run at the next one.
    Its calls share one outage (`_Operation`): one waiting line at the first failure, one recovery line at the
    first call that succeeds after it, timed from that first failure; and one deadline, that first failure +
    `storage.outage_budget_s`, which also ends the retries of every call inside (see the module doc)."""
    storage = storage or StorageConfig()
    outer = _operation.get()
    # An operation inside another is part of the outer one's outage, and of its deadline.
    operation = outer or _Operation(what, storage.outage_budget_s)

    def waiting(attempt: int, exc: BaseException, wait: float) -> None:
        operation.failed()  # a call that gave up without retries of its own (storage.retries=0) opens it here
        logger.warning("%s: %s; trying again in %.0f s (for up to %g s: storage.outage_budget_s)", what, exc, wait,
                       storage.outage_budget_s)

    token = _operation.set(operation)
    try:
        return retry_call(fn, retry_if=gave_up_on_transient, wait_s=lambda n: backoff_s(MAX_BACKOFF_S, n),
                          within_s=storage.outage_budget_s, before_retry=waiting, until=operation.expired)
    finally:
        _operation.reset(token)


@dataclass
class _Operation:
    """The outage of an operation that `outlasting_outages` repeats, from the first failure of any of its calls
    (`since`) to the first call that succeeds after it, and its deadline: `budget_s` after the first failure of
    the operation (a recovery in between does not renew it)."""

    what: str
    budget_s: float
    since: float | None = None
    deadline: float | None = None

    def failed(self) -> bool:
        """Note a failure; True if it opens the outage (the caller logs the waiting line)."""
        if self.since is not None:
            return False
        self.since = time.monotonic()
        if self.deadline is None:
            self.deadline = self.since + self.budget_s
        return True

    def expired(self) -> bool:
        """Whether the operation's budget is spent: no retry inside it may wait any longer."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def succeeded(self, call: str) -> None:
        if self.since is not None:
            logger.info("storage back after %.1f s (%s; %s)", time.monotonic() - self.since, self.what, call)
            self.since = None


# The operation the calls of this thread belong to (None: each call is on its own). A ContextVar, so a background
# save and a training thread's reads keep theirs apart.
_operation: contextvars.ContextVar[_Operation | None] = contextvars.ContextVar("storage_operation", default=None)


class _OutageLog:
    """The two lines an outage is logged as: the first failure (WARNING) and the recovery (INFO). In an operation
    (`outlasting_outages`) the outage is the operation's: only its first failure is a WARNING, and the first call
    that succeeds after it logs the recovery."""

    def __init__(self, what: str, storage: StorageConfig, outage: bool) -> None:
        self.what = what
        self.budget = (f"{storage.outage_budget_s:g} s (storage.outage_budget_s)" if outage
                       else f"{storage.retries} more attempts (storage.retries)")
        self.attempts = 0
        self._since: float | None = None
        self._operation = _operation.get()

    def retrying(self, attempt: int, exc: BaseException, wait: float) -> None:
        self.attempts = attempt
        if self._since is not None:
            logger.debug("%s: attempt %d failed (%s); next in %.2f s", self.what, attempt, describe(exc), wait)
            return
        self._since = time.monotonic()
        if self._operation is None or self._operation.failed():
            logger.warning("storage unreachable (%s: %s): retrying for up to %s", self.what, describe(exc),
                           self.budget)
        else:  # the operation's outage is logged already
            logger.debug("%s: failed too (%s)", self.what, describe(exc))

    def waited_s(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since

    def back(self) -> None:
        if self._operation is not None:
            self._operation.succeeded(self.what)
        elif self._since is not None:
            logger.info("storage back after %.1f s (%s, %d attempts)", self.waited_s(), self.what, self.attempts + 1)
