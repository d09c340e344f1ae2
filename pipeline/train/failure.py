"""Deterministic failures recorded in the run directory, so that Ray Train does not retry them.

Ray Train (V2, Ray's default) retries any exception the training function raises, `FailureConfig.max_failures`
times, and has no option to exempt exception types. A NaN/Inf stop (`NonFiniteError`) would recur at the same
step after every restart, burning the retries. So the workers catch it; rank 0 records it in `<run>/FAILED.json`
(step and message); every rank returns normally (they all stop at the same step, the decision being made on the
all-reduced gradient norm); and `launch()` raises it again on the driver. Rank 0 clears the record whenever a
worker group starts, so a stale one never outlives a later attempt.
"""

from __future__ import annotations

import json

from pipeline.config import StorageConfig
from pipeline.storage import exists, join_url, read_bytes, remove, write_bytes
from pipeline.train.step import NonFiniteError

FAILED = "FAILED.json"


def record_failure(run_dir: str, error: NonFiniteError, storage: StorageConfig | None = None) -> None:
    """Write `<run>/FAILED.json` (rank 0 only: every rank holds the same error)."""
    record = {"error": type(error).__name__, "step": error.step, "message": str(error)}
    write_bytes(join_url(run_dir, FAILED), json.dumps(record).encode(), storage)


def clear_failure(run_dir: str, storage: StorageConfig | None = None) -> None:
    remove(join_url(run_dir, FAILED), storage)


def raise_recorded_failure(run_dir: str, storage: StorageConfig | None = None) -> None:
    """Raise the `NonFiniteError` a run recorded, if it recorded one."""
    url = join_url(run_dir, FAILED)
    if exists(url, storage):
        record = json.loads(read_bytes(url, storage))
        raise NonFiniteError(record["message"], step=record["step"])
