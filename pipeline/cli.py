"""The start-up every job shares: one log format, a refused input reported as one line with exit code 2, and an
orderly stop on SIGTERM. Which exceptions are refused inputs, the exit codes, and what SIGTERM means in a training
worker instead: `pipeline.train.faults`, the one fault story.

A job's `main(argv) -> int` is wrapped with `job_main`. Exceptions that mean "the input is wrong or unreachable"
(bad config, a dataset that does not fit the config, a missing manifest, storage that refuses or stays down after
its retries, missing demo, export or local S3 packages) and the deterministic stops of training (a NaN/Inf loss,
too much corrupt data: a retry would fail the same way) end the job with `error: <Type>: <message>` on stderr and
exit code 2; the traceback goes to the log at DEBUG level. Any other exception is a bug and keeps its traceback
(exit code 1).

SIGTERM (`ray job stop`, Kubernetes, `kill`) raises `Terminated` in the main thread instead of ending the process
on the spot, so `finally` blocks and context managers run: DataLoader workers are shut down and joined, the fork
server and the resource tracker they hold then exit, staging directories are removed; the exit code is 143
(128 + SIGTERM), as a killed process's. A second SIGTERM ends the process at once. SIGINT (Ctrl-C) unwinds the same
way (`Interrupted`) and ends the job with one line, `interrupted`, on stderr and exit code 130 (128 + SIGINT), the
traceback at DEBUG level; a second Ctrl-C ends the process at once.

While Ray Train's `fit()` runs, its own SIGINT handler replaces ours: it aborts the run (its workers stop) and
exits, which Ray's `ray.get` reports as `SystemExit(1)`, and our SIGTERM's `Terminated` turns into the same. So the
job notes which signals arrived, whoever handled them (`signals_seen`: the signal module's wakeup fd, written for
every handled signal), and a job that ends by any exception after a SIGINT or SIGTERM ends as the signal says.
The fork server the workers started from is then ended with the job (`stop_fork_server`), not left to outlive it
as an orphan.
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

from pipeline.cluster import keep_fault_lines_whole
from pipeline.train.faults import EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_TERMINATED, refused_input

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

log = logging.getLogger(__name__)

JobMain = Callable[[Sequence[str] | None], int]


def refusal_line(exc: BaseException) -> str:
    """The one line a refused input prints: the exception's type (it names the kind of problem) and message."""
    return f"error: {type(exc).__name__}: {exc}"


class Terminated(SystemExit):
    """The job received SIGTERM: raised in its main thread so that it unwinds in order (exit code 143)."""


class Interrupted(KeyboardInterrupt):
    """The job received SIGINT (Ctrl-C): raised in its main thread so that it unwinds in order (exit code 130)."""


def _terminate(signum: int, frame: object) -> None:
    del frame
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    log.warning("SIGTERM received: stopping (shutting down worker processes; a second one kills at once)")
    raise Terminated(128 + signum)


def _interrupt(signum: int, frame: object) -> None:
    del frame
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
    raise Interrupted()


@contextlib.contextmanager
def stop_in_order() -> Iterator[None]:
    """While the body runs, SIGTERM raises `Terminated` and SIGINT `Interrupted` in the main thread (no-op in
    other threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, _interrupt)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_seen() -> Iterator[Callable[[], set[int]]]:
    """While the body runs, record every signal this process handles, whichever Python handler took it (Ray Train
    installs its own SIGINT handler during `fit()`): the signal module writes each one's number to the wakeup fd.
    Yields a function returning the numbers seen so far (empty outside the main thread, where it cannot watch)."""
    if threading.current_thread() is not threading.main_thread():
        yield set
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    seen: set[int] = set()

    def arrived() -> set[int]:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(read_fd, 512):
                seen.update(data)
        return seen

    try:
        yield arrived
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)


def stopped_by_signal(exc: BaseException, arrived: set[int]) -> int | None:
    """The exit code of a job that `exc` ended after a stop signal (printing the one line a Ctrl-C gives), or None
    when no signal explains it."""
    if isinstance(exc, KeyboardInterrupt) or signal.SIGINT in arrived:
        log.debug("interrupted", exc_info=exc)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, Terminated) or signal.SIGTERM in arrived:
        log.debug("terminated", exc_info=exc)
        return EXIT_TERMINATED
    return None


def stop_fork_server() -> None:
    """End multiprocessing's fork server (DataLoader and shard-writer workers start from it) and the workers still
    running from it, as the job stops. Left alone, the workers end with this process (their watch on it,
    `pipeline.data.loading.workers`), and the server only after an interpreter shutdown of what it preloaded (torch
    among it): 0.5 s on an idle machine, ~8 s on a loaded one, as an orphan of a job that had already exited. Workers go
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
    SIGTERM and SIGINT (see the module doc)."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        keep_fault_lines_whole()  # before Ray is imported: the driver prints every worker's outage lines at once
        with signals_seen() as arrived:
            try:
                with stop_in_order():
                    return main(argv)
            except BaseException as exc:
                code = stopped_by_signal(exc, arrived())
                if code is not None:
                    stop_fork_server()
                    return code
                if not isinstance(exc, refused_input()):
                    raise
                log.debug("refused input", exc_info=True)
                print(refusal_line(exc), file=sys.stderr)
                return EXIT_REFUSED

    return run
