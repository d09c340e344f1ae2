"""Training metrics to three places: a console progress line, TensorBoard, and Ray Train (`ray.train.report`).

Only rank 0 writes to the console and TensorBoard, at every logging step. Ray Train's report is a barrier that
every rank must reach the same number of times and a round trip through Ray's controller, so the loop reports
the latest record to Ray only at checkpoint steps (`report()`): logging every 10 steps must not slow training.
The console and TensorBoard carry the full curve. TensorBoard event files go straight into
`<run>/tensorboard/` when the run directory is local; for object storage they are written to a local directory
and uploaded whole on `flush()`/`close()` (TensorBoard cannot append to S3 objects). The loop flushes at every
checkpoint and closes on the way out of a failed run too, so a run's curves are visible while it trains and
survive a failure (a killed process keeps them up to its last checkpoint).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config
from pipeline.storage import is_local_url, join_url, local_path, upload_file

log = logging.getLogger(__name__)


class MetricsWriter:
    """Writes one record per logging step; `last` holds the latest record (returned by the loop)."""

    def __init__(self, run_dir: str, config: Config, *, enabled: bool, report: Callable[[dict], None] | None) -> None:
        self.config = config
        self.enabled = enabled
        self._report = report
        self.last: dict | None = None
        self._remote = None if is_local_url(run_dir) else join_url(run_dir, "tensorboard")
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            local = (tempfile.mkdtemp(prefix="tensorboard-") if self._remote
                     else os.path.join(local_path(run_dir), "tensorboard"))
            self._local_dir = local
            self._writer = SummaryWriter(local)

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

    def report(self) -> None:
        """The latest record to Ray Train (every rank must call this equally often: it is a barrier)."""
        if self._report is not None and self.last is not None:
            self._report(self.last)

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self._remote:
            for path in Path(self._local_dir).glob("events.*"):
                upload_file(str(path), join_url(self._remote, path.name), self.config.storage)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
