"""The start-up every job shares: one log format, a refused input reported as one line with exit code 2, and an
orderly stop on SIGTERM.

A job's `main(argv) -> int` is wrapped with `job_main`. Exceptions that mean "the input is wrong or unreachable"
(bad config, a dataset that does not fit the config, a missing manifest, storage that refuses or stays down after
its retries, missing demo, export or local S3 packages) and the deterministic stops of training (a NaN/Inf loss,
too much corrupt data: a retry would fail the same way) end the job with `error: <Type>: <message>` on stderr and
exit code 2; the traceback goes to the log at DEBUG level. Any other exception is a bug and keeps its traceback
(exit code 1).

SIGTERM (`ray job stop`, Kubernetes, `kill`) raises `Terminated` in the main thread instead of ending the process
on the spot, so `finally` blocks and context managers run: DataLoader workers are shut down and joined, the fork
server and the resource tracker they hold then exit, staging directories are removed; the exit code is 143
(128 + SIGTERM), as a killed process's. A second SIGTERM ends the process at once. The fork server the workers
started from is ended with the job (`stop_fork_server`), not left to outlive it as an orphan.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from pipeline.storage import StorageError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
EXIT_REFUSED = 2

log = logging.getLogger(__name__)

JobMain = Callable[[Sequence[str] | None], int]


def refused_input() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a refused input. ValueError covers ConfigError, ManifestError, ShardSplitError,
    LabelsFileError and the data-vs-config checks. Imported when needed: a job's `--help` never loads torch."""
    from pipeline.data.demo.scene import DemoAssetsMissing
    from pipeline.data.shard_writer import ShardWriteError
    from pipeline.data.stream import BadDataError
    from pipeline.models.programs import ExportPackagesMissing
    from pipeline.storage.local_s3 import SeaweedFSMissing
    from pipeline.train.step import NonFiniteError

    return (ValueError, StorageError, DemoAssetsMissing, ShardWriteError, ExportPackagesMissing, BadDataError,
            NonFiniteError, SeaweedFSMissing)


def refusal_line(exc: BaseException) -> str:
    """The one line a refused input prints: the exception's type (it names the kind of problem) and message."""
    return f"error: {type(exc).__name__}: {exc}"


class Terminated(SystemExit):
    """The job received SIGTERM: raised in its main thread so that it unwinds in order (exit code 143)."""


def _terminate(signum: int, frame: object) -> None:
    del frame
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    log.warning("SIGTERM received: stopping (shutting down worker processes; a second one kills at once)")
    raise Terminated(128 + signum)


@contextlib.contextmanager
def stop_in_order_on_sigterm() -> Iterator[None]:
    """While the body runs, SIGTERM raises `Terminated` in the main thread (no-op in other threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_fork_server() -> None:
    """End multiprocessing's fork server (DataLoader and shard-writer workers start from it) and the workers still
    running from it, as the job stops. Left alone, the workers end with this process (their watch on it,
    `pipeline.data.workers`), and the server only after an interpreter shutdown of what it preloaded (torch among
    it): 0.5 s on an idle machine, ~8 s on a loaded one, as an orphan of a job that had already exited. Workers go
    first and by SIGKILL, as they would a moment later: with their server gone first they would start an orderly
    exit of their own, sending batches to a process that is going away. The server keeps no state; `_stop` (the
    stdlib's own, for its tests) then reaps it and forgets it, so a later worker in this process starts a new one.
    A Python without these names, or without /proc, keeps the old behaviour (in part)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None or not hasattr(server, "_stop"):
        return
    for child in [*child_pids(pid), pid]:
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(OSError):
        server._stop()


def child_pids(pid: int) -> list[int]:
    """The PIDs whose parent is `pid`, from /proc (none where there is no /proc)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry.name}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
    return found


def job_main(main: JobMain) -> JobMain:
    """Run a job's `main` with the shared logging set-up, the refused-input contract and the orderly stop on
    SIGTERM (see the module doc)."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        try:
            with stop_in_order_on_sigterm():
                return main(argv)
        except Terminated:
            stop_fork_server()
            raise
        except Exception as exc:
            if not isinstance(exc, refused_input()):
                raise
            log.debug("refused input", exc_info=True)
            print(refusal_line(exc), file=sys.stderr)
            return EXIT_REFUSED

    return run
