"""Deterministic stops recorded in the run directory, so that Ray Train does not retry them.

Ray Train (V2, Ray's default) retries any exception the training function raises, `FailureConfig.max_failures`
times, and has no option to exempt exception types. A NaN/Inf stop (`NonFiniteError`) would recur at the same step
after every restart, and too much corrupt data (`BadDataError`) on the same shards, burning the retries. So the
workers catch them; rank 0 records the error in `<run>/FAILED.json` (type, step, message); every rank returns
normally (they all stop at the same step: the NaN decision is made on the all-reduced gradient norm, bad data by
the per-step stop agreement); and `launch()` raises it again on the driver, where the job ends with one line and
exit code 2. `launch()` clears the record first, so a stale one never outlives a later launch.
"""

from __future__ import annotations

import json

from pipeline.config import StorageConfig
from pipeline.data.loading import BadDataError
from pipeline.storage import exists, join_url, read_bytes, remove, write_bytes
from pipeline.train.step import NonFiniteError

FAILED = "FAILED.json"
DETERMINISTIC_STOPS = (NonFiniteError, BadDataError)


def record_failure(run_dir: str, error: NonFiniteError | BadDataError, storage: StorageConfig | None = None) -> None:
    """Write `<run>/FAILED.json` (rank 0 only: every rank holds the same error)."""
    record = {"error": type(error).__name__, "step": getattr(error, "step", None), "message": str(error)}
    write_bytes(join_url(run_dir, FAILED), json.dumps(record).encode(), storage)


def clear_failure(run_dir: str, storage: StorageConfig | None = None) -> None:
    remove(join_url(run_dir, FAILED), storage)


def raise_recorded_failure(run_dir: str, storage: StorageConfig | None = None) -> None:
    """Raise the deterministic stop a run recorded, if it recorded one."""
    url = join_url(run_dir, FAILED)
    if exists(url, storage):
        record = json.loads(read_bytes(url, storage))
        if record.get("error") == BadDataError.__name__:
            raise BadDataError(record["message"])
        raise NonFiniteError(record["message"], step=record["step"])
