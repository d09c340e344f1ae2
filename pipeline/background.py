"""One background worker for the project's background threads: a bounded queue, a close with a timeout, and one
error policy.

`BackgroundWorker` runs submitted jobs in order on one daemon thread. Used by the checkpoint upload
(`pipeline.checkpoint.checkpointer`), the side uploads (`pipeline.storage.mirror`) and the tracking sender
(`pipeline.tracking.tracker`); it imports nothing of the project, so any layer may use it.

- **Bounded**: at most `max_pending` jobs wait (the running one aside). `submit` waits for room up to its
  `timeout_s` (None: as long as it takes; 0: not at all) and says whether the job was queued, so the owner decides
  between waiting (a checkpoint save: bounded memory) and dropping (a tracking call: never delay training).
- **Close with a timeout**: `close(timeout_s)` lets the queued jobs run, waits at most `timeout_s` for them, and says
  whether the worker finished; calling it again waits again. A worker that did not finish is left running as a
  daemon thread: it never holds up the process's exit.
- **One error policy**: an exception a job raises is kept and raised again in the owner's thread, at its next
  `submit`, `wait` or `close` (once; the jobs queued after it still run). An owner whose jobs must never fail the
  caller (tracking, side uploads) handles errors inside its jobs.

Hand-written rather than `concurrent.futures.ThreadPoolExecutor(max_workers=1)`: the executor's threads are joined
at interpreter exit, so one stuck call to a tracking server or a stalled store would keep a finished job's process
from exiting; its queue is unbounded too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

Job = Callable[[], None]


class BackgroundWorker:
    """Runs submitted jobs in order on one daemon thread named `name` (see the module doc)."""

    def __init__(self, name: str, max_pending: int = 1) -> None:
        self.name = name
        self._jobs: queue.Queue[Job | None] = queue.Queue(max_pending)
        self._idle = threading.Condition()
        self._unfinished = 0  # queued or running
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def unfinished(self) -> int:
        """Jobs queued or running."""
        with self._idle:
            return self._unfinished

    def submit(self, job: Job, *, timeout_s: float | None = None) -> bool:
        """Queue `job`; False when `max_pending` jobs still wait after `timeout_s` (None: wait for room, 0: do not
        wait). Raises an earlier job's error first; after `close`, a RuntimeError."""
        self.raise_error()
        if self._closed:
            raise RuntimeError(f"{self.name}: submit after close")
        with self._idle:
            self._unfinished += 1
        try:
            self._jobs.put(job, block=timeout_s != 0, timeout=timeout_s or None)
        except queue.Full:
            self._done()
            return False
        return True

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until no job is queued or running (True), at most `timeout_s`; then raise a job's error, if any."""
        with self._idle:
            idle = self._idle.wait_for(lambda: self._unfinished == 0, timeout_s)
        self.raise_error()
        return idle

    def close(self, timeout_s: float | None = None) -> bool:
        """Let the queued jobs run and the thread end, waiting at most `timeout_s`; whether it ended. Raises a job's
        error, if any. Idempotent: a second call waits again."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._closed:
            self._closed = True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._jobs.put(None, block=left != 0, timeout=left or None)  # the end, after every queued job
            except queue.Full:
                self._closed = False  # the end is not queued: a later close queues it
                self.raise_error()
                return False
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.raise_error()
        return not self._thread.is_alive()

    def raise_error(self) -> None:
        """Raise the error a job raised since the last call, in the caller's thread."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # raised again in the owner's thread
                self._error = self._error or exc
            finally:
                self._done()

    def _done(self) -> None:
        with self._idle:
            self._unfinished -= 1
            self._idle.notify_all()
