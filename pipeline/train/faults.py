"""The fault story in one place: every way a job or a training run stops, its exit code, and whether Ray retries it.

| stop                       | raised as                                    | exit | Ray Train retries it?          |
|----------------------------|----------------------------------------------|------|--------------------------------|
| refused input              | `refused_input()`: ValueError (a bad config, | 2    | never reaches Ray (driver)     |
|                            | data that does not fit it), StorageError     |      |                                |
|                            | (refused, or down past the outage budget),   |      |                                |
|                            | a missing package or asset                   |      |                                |
| deterministic stop         | `deterministic_stops()`: NonFiniteError      | 2    | no: recorded in FAILED.json,   |
|                            | (NaN/Inf), BadDataError (corrupt data)       |      | every rank returns normally    |
| preemption (worker notice) | `Preempted`, after its checkpoint            | -    | yes: `cluster.max_preemptions` |
| a peer rank lost, a crash  | `PeerLost`, any other exception              | -    | yes: `cluster.max_failures`    |
| job stopped (SIGTERM)      | `pipeline.cli.Terminated`                    | 143  | the whole job ends             |
| job interrupted (SIGINT)   | `pipeline.cli.Interrupted`                   | 130  | the whole job ends             |
| a bug                      | anything else, with its traceback            | 1    | (in a worker: as a crash)      |

**Deterministic stops are recorded, not raised.** Ray Train (V2) retries any exception the training function raises,
`FailureConfig.max_failures` times, and has no option to exempt exception types. A NaN/Inf stop would recur at the
same step after every restart, and too much corrupt data on the same shards, burning the retries. So the workers
catch them; rank 0 records the error in `<run>/FAILED.json` (type, step, message); every rank returns normally
(they all stop at the same step: the NaN decision is made on the all-reduced gradient norm, bad data by the
per-step stop agreement); and `launch()` raises it again on the driver, where the job ends with one line and exit
code 2. `launch()` clears the record first, so a stale one never outlives a later launch.

**SIGTERM has two meanings, by process.**

- *In a job's process* (the driver, any `jobs/*.py`; `pipeline.cli.job_main`): "stop the job". `ray job stop`,
  Kubernetes or `kill` send it; it raises `Terminated` in the main thread so the job unwinds in order (workers
  joined, staging removed) and exits 143; a second one kills at once.
- *In a Ray Train worker process* (`PreemptionNotice`, installed on the worker's main thread by
  `pipeline.train.ray_internals`): "this node is about to go" (a cloud that signals processes, an operator). The
  handler only notes it; every rank learns of it at the next step's agreement (`pipeline.train.stopping`),
  rank 0 checkpoints that step, and every rank raises `Preempted`, so Ray restarts the group from it. Outside a
  training loop, and on a second SIGTERM, the signal goes to the handler there was before (Ray's ends the worker).

A node drain seen by Ray (`ray.train.get_preemption_info`) is the same notice by another road (`stopping`).
A storage outage is not a stop until it outlasts `storage.outage_budget_s` (`pipeline.storage.retries`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from pipeline.storage import StorageError, exists, join_url, read_bytes, remove, write_bytes
from pipeline.storage.settings import StorageConfig

log = logging.getLogger(__name__)

EXIT_REFUSED = 2
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a killed process's
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
FAILED = "FAILED.json"


def deterministic_stops() -> tuple[type[BaseException], ...]:
    """The stops a retry would meet again: recorded, never raised to Ray (imported when needed: a job's `--help`
    never loads torch)."""
    from pipeline.data.loading import BadDataError
    from pipeline.train.step import NonFiniteError

    return NonFiniteError, BadDataError


def refused_input() -> tuple[type[BaseException], ...]:
    """The exceptions that end a job with one line and exit code 2: a refused input, or a deterministic stop.
    ValueError covers ConfigError, ManifestError, ShardSplitError, LabelsFileError, MissingEmaWeights and the
    data-vs-config checks."""
    from pipeline.data.demo import DemoAssetsMissing
    from pipeline.data.writing import ShardWriteError
    from pipeline.models.programs import ExportPackagesMissing
    from pipeline.storage.local_s3 import SeaweedFSMissing

    return (ValueError, StorageError, DemoAssetsMissing, ShardWriteError, ExportPackagesMissing, SeaweedFSMissing,
            *deterministic_stops())


# Deterministic stops: recorded by the workers, raised again on the driver -----------------------------------------

def record_failure(run_dir: str, error: BaseException, storage: StorageConfig | None = None) -> None:
    """Write `<run>/FAILED.json` (rank 0 only: every rank holds the same error)."""
    record = {"error": type(error).__name__, "step": getattr(error, "step", None), "message": str(error)}
    write_bytes(join_url(run_dir, FAILED), json.dumps(record).encode(), storage)


def clear_failure(run_dir: str, storage: StorageConfig | None = None) -> None:
    remove(join_url(run_dir, FAILED), storage)


def raise_recorded_failure(run_dir: str, storage: StorageConfig | None = None) -> None:
    """Raise the deterministic stop a run recorded, if it recorded one."""
    url = join_url(run_dir, FAILED)
    if exists(url, storage):
        non_finite, bad_data = deterministic_stops()
        record = json.loads(read_bytes(url, storage))
        if record.get("error") == bad_data.__name__:
            raise bad_data(record["message"])
        raise non_finite(record["message"], step=record["step"])


# SIGTERM in a training worker: a preemption notice --------------------------------------------------------------

class PreemptionNotice:
    """The SIGTERM handler of a training worker: notes a preemption notice while a training loop accepts them.

    Its state lives in the installed handler itself (found again with `installed()`), not in module globals: the
    signal table is the one per-process place both the handler (worker's main thread) and the loop (Ray's
    training thread) reach."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous  # the handler before this one: a second SIGTERM, or one outside training, goes there
        self.noticed = threading.Event()
        self.training = threading.Event()  # a training loop (or a worker's start-up) is running

    def __call__(self, signum: int, frame: Any) -> None:
        if (self.noticed.is_set() or not self.training.is_set()) and callable(self.previous):
            self.previous(signum, frame)
            return
        self.noticed.set()
        log.warning("SIGTERM received (preemption notice): every rank checkpoints at the next step and stops")

    @staticmethod
    def install() -> bool:
        """Make SIGTERM a preemption notice (this process's main thread only), with no notice noted yet; whether it
        was installed. Installing again starts afresh, keeping the handler there was before the first."""
        if threading.current_thread() is not threading.main_thread():
            return False
        current = PreemptionNotice.installed()
        previous = current.previous if current is not None else signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, PreemptionNotice(previous))
        return True

    @staticmethod
    def installed() -> PreemptionNotice | None:
        """The preemption handler of this process, if SIGTERM has one (readable from any thread)."""
        handler = signal.getsignal(signal.SIGTERM)
        return handler if isinstance(handler, PreemptionNotice) else None


def preemption_noticed() -> bool:
    """Whether this process got a preemption notice (SIGTERM while a loop accepted them)."""
    notice = PreemptionNotice.installed()
    return notice is not None and notice.noticed.is_set()


@contextlib.contextmanager
def accepting_notices() -> Iterator[None]:
    """SIGTERM is a preemption notice from here on, a worker's start-up (restore, init_from, the loader) included:
    the first step's agreement acts on a notice that came before it (one step, its checkpoint, stop). A no-op
    where no `PreemptionNotice` is installed (`train()` called directly leaves signals alone)."""
    notice = PreemptionNotice.installed()
    if notice is None:
        yield
        return
    notice.training.set()
    try:
        yield
    finally:
        notice.training.clear()
