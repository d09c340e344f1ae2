"""Training scalars (loss, lr, throughput, data wait) to the console, TensorBoard and Ray Train's report.

`ScalarWriter.log` counts every step into a window and, at each logging step (`train.log_every`, and the last
step), builds the window's record: samples/s over all wall time since the previous record (writing records and
checkpoints included), the fraction of it spent waiting for data (`waiting_for_data`), and the loader's counters
of the whole job (every rank's, gathered: a log line with rank 0's alone missed the other ranks' skipped samples).
Every rank builds it (`last`; returned by the loop, committed with checkpoints); only rank 0 writes it out.

Ray Train's report is a barrier that every rank must reach the same number of times and a round trip through Ray's
controller, so the loop publishes the latest record to Ray only at checkpoint steps (`publish`): logging every 10
steps must not slow training. The console and TensorBoard carry the full curve. TensorBoard event files go straight
into `<run>/tensorboard/` when the run directory is local; for object storage they are written to a local staging
directory (`/tmp/tensorboard-<host>-<pid>-*`) and uploaded whole (TensorBoard cannot append to S3 objects) by a
background thread (`pipeline.storage.mirror`): `flush()` asks for an upload and returns at once, so a slow or
unreachable store never delays a step; a failed upload is logged once and the next one sends the newest events. The
loop publishes at every checkpoint and closes on the way out of a failed run too (an exception, a preemption,
SIGINT), so a run's curves are visible while it trains and survive a failure (a killed process keeps them up to its
last checkpoint). `close()` waits at most `TENSORBOARD_CLOSE_WAIT_S` for the last upload, then removes the staging
directory (kept, and named in a warning, if the last upload failed). A killed process's directory is removed by the
next writer started on that host (`pipeline.storage.mirror.staging_directory`).

With `tracking.backend` set, rank 0 also sends the config and every record to the tracked run (`pipeline.tracking`:
queued for a background thread, so a slow or unreachable tracking server never delays a step), and closing marks
that run finished, or failed when the loop is on its way out of an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from pipeline.config import Config
from pipeline.data.loading import ShardStream, job_metrics
from pipeline.storage import is_local_url, join_url, local_path
from pipeline.storage.mirror import DirectoryMirror, staging_directory
from pipeline.tracking import Tracker, start_tracking
from pipeline.train.ranks import WorkerContext, gather_ranks, mean_over_ranks
from pipeline.train.step import StepResult, TrainState

log = logging.getLogger(__name__)

STAGING_PREFIX = "tensorboard-"  # /tmp/tensorboard-<host>-<pid>-*: TensorBoard's events of a run on object storage
TENSORBOARD_CLOSE_WAIT_S = 30.0  # the end of a run waits this long at most for the last TensorBoard upload


class ScalarWriter:
    """Builds one record per logging step and writes it (rank 0); `last` holds the latest record."""

    def __init__(self, run_dir: str, config: Config, *, enabled: bool,
                 report: Callable[[dict, str | None], None] | None,
                 ctx: WorkerContext | None = None) -> None:
        self.config = config
        self.enabled = enabled
        self.ctx = ctx or WorkerContext()
        self._report = report
        self.last: dict | None = None
        self._window_start: float | None = None  # the first wait for data opens the first window
        self._window_steps = self._window_ignored = 0
        self._wait_s = 0.0
        self._writer = None
        self.uploads: DirectoryMirror | None = None  # the staging directory's uploads (object storage only)
        self.tracker = start_tracking(run_dir, config, role="train") if enabled else Tracker()
        self.tracker.log_config(config.model_dump(mode="json"))
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if is_local_url(run_dir):
                local = os.path.join(local_path(run_dir), "tensorboard")
            else:
                local = staging_directory(STAGING_PREFIX)
                self.uploads = DirectoryMirror(local, join_url(run_dir, "tensorboard"), config.storage,
                                               what="TensorBoard events", pattern="events.*", owns_dir=True)
            self._writer = SummaryWriter(local)

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Time spent in this block counts as waiting for data (fetching a batch and moving it to the device)."""
        start = time.perf_counter()
        if self._window_start is None:
            self._window_start = start
        try:
            yield
        finally:
            self._wait_s += time.perf_counter() - start

    def log(self, state: TrainState, result: StepResult, loader: ShardStream) -> None:
        """Count the step just taken; at a logging step, build and write the window's record."""
        self._window_steps += 1
        self._window_ignored += result.ignored
        train = self.config.train
        if state.step % train.log_every != 0 and state.step != train.total_steps:
            return
        # The window runs from the previous logging step to this one, so the time spent writing records and
        # checkpoints counts against the throughput it reports.
        now = time.perf_counter()
        elapsed = now - self._window_start
        # The loader's counters and the padding of every rank (collective): the job's bad data, not rank 0's.
        ranks = gather_ranks((loader.metrics(), self._window_ignored), self.ctx)
        data = job_metrics([metrics for metrics, _ in ranks])
        record = {
            # The mean of the ranks' losses (collective): the global batch's loss when their batches are full, so a
            # curve does not change with the world size; each rank's own is the loss of its share only.
            "step": state.step, "samples_seen": state.samples_seen, "loss": mean_over_ranks(result.loss, self.ctx),
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "samples_per_s": self._window_steps * train.global_batch_size / elapsed,
            "samples_per_s_per_worker": self._window_steps * loader.split.batch_size / elapsed,
            "world_size": loader.split.world_size,  # elastic runs: how many ranks trained this window
            "data_wait_fraction": self._wait_s / elapsed, "skipped_nonfinite": state.skipped_nonfinite,
            "ignored_images": sum(ignored for _, ignored in ranks),  # since the last record: padding (+ unlabeled)
            **{f"data/{k}": v for k, v in data.items()},
        }
        self._window_start, self._window_steps, self._window_ignored, self._wait_s = now, 0, 0, 0.0
        self.write(record)

    def write(self, record: dict) -> None:
        self.last = record
        if not self.enabled:
            return
        total = self.config.train.total_steps
        log.info("step %d/%d  loss %.4f  lr %.3g  %.1f samples/s (%.1f per worker)  data wait %.0f%%  skipped %d",
                 record["step"], total, record["loss"], record["lr"], record["samples_per_s"],
                 record["samples_per_s_per_worker"], 100 * record["data_wait_fraction"],
                 int(record.get("data/skipped", 0)))
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._writer.add_scalar(key, value, global_step=record["step"])
        self.tracker.log_scalars(record["step"], {k: v for k, v in record.items() if k != "step"})

    def publish(self, step: int, checkpoint_url: str | None = None) -> None:
        """At a checkpoint step: the latest record (with `checkpoint_url`, one committed since the last publish) to
        Ray Train, and TensorBoard's events to the run directory.

        Every rank must call this equally often (Ray's report is a barrier). The TensorBoard upload runs in the
        background: a failed one is never worth a lost run or a delayed step (see the module doc)."""
        if self._report is not None and self.last is not None:
            self._report(self.last, checkpoint_url)
        self.flush()

    def flush(self) -> None:
        """Write TensorBoard's buffered events; on object storage, ask for their upload (returns at once)."""
        if self._writer is None:
            return
        self._writer.flush()
        if self.uploads is not None:
            self.uploads.request()

    def close(self, failed: bool = False) -> None:
        """Close TensorBoard's writer and upload its events (waiting at most `TENSORBOARD_CLOSE_WAIT_S`), remove the
        staging directory, then close the tracked run (marked failed with `failed`)."""
        try:
            if self._writer is not None:
                self._writer.close()
            if self.uploads is not None:
                self.uploads.close(TENSORBOARD_CLOSE_WAIT_S)
        finally:
            self.tracker.close(failed=failed)
