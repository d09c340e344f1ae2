"""The checkpoint-watching evaluator: every new complete checkpoint of a run -> one MAP@100 report line.

Idempotent and resumable by construction: the set of evaluated steps is read back from `reports/map100.jsonl`
before each poll, so a restarted evaluator (or a second one) skips what is done; only committed checkpoints
(COMMIT marker present) are ever listed, so partial ones are never read. A checkpoint deleted by retention
between listing and reading is skipped with a warning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline.config import Config, StorageConfig
from pipeline.data import read_manifest
from pipeline.data.manifest import read_classes
from pipeline.evaluation.evaluator import Evaluation, checkpoint_config, evaluate_checkpoint
from pipeline.evaluation.report import append_record, read_records, write_report
from pipeline.storage import StorageError, join_url
from pipeline.storage.checkpoints import CheckpointRef, committed_checkpoints

log = logging.getLogger(__name__)


def run_dir_of(checkpoint_url: str) -> str:
    """The run directory of a checkpoint URL (<run>/checkpoints/step-N)."""
    parts = checkpoint_url.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parts[1] != "checkpoints":
        raise ValueError(f"{checkpoint_url} is not a checkpoint URL of the form <run>/checkpoints/step-NNNNNNNNN")
    return parts[0]


class CheckpointWatcher:
    """Evaluates a run's checkpoints as they appear; `run(once=True)` evaluates what is there and returns."""

    def __init__(self, run_dir: str, *, eval_prefix: str | None = None, weights: str | None = None,
                 storage: StorageConfig | None = None, workers: int = 1, poll_seconds: float = 30.0,
                 tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.reports_dir = join_url(run_dir, "reports")
        self.eval_prefix = eval_prefix
        self.weights = weights
        self.storage = storage
        self.workers = workers
        self.poll_seconds = poll_seconds
        self.tensorboard = tensorboard

    def pending(self, only: str | None = None) -> list[CheckpointRef]:
        """Committed checkpoints without a report line (only the one at URL `only`, if given)."""
        done = {r["step"] for r in read_records(self.reports_dir, self.storage)}
        refs = [ref for ref in committed_checkpoints(self.run_dir, self.storage) if ref.step not in done]
        if only is not None:
            refs = [ref for ref in refs if ref.url.rstrip("/") == only.rstrip("/")]
        return refs

    def evaluate(self, ref: CheckpointRef) -> Evaluation:
        """Evaluate one checkpoint, record it, regenerate the report."""
        evaluation = evaluate_checkpoint(ref.url, self.eval_prefix, weights=self.weights, storage=self.storage,
                                         workers=self.workers)
        append_record(self.reports_dir, evaluation.record(), self.storage)
        config = checkpoint_config(ref.url, self.storage)
        names, frequency = self._classes(config)
        url = write_report(self.reports_dir, evaluation, names, frequency, self.storage)
        if self.tensorboard:
            self._tensorboard(evaluation)
        scalars = evaluation.result.scalars()
        log.info("step %d: MAP@%d %.2f%% (per image %.2f%%) on %d images in %.1fs -> %s", evaluation.step,
                 evaluation.result.k, 100 * evaluation.result.map_at_k, 100 * evaluation.result.image_map_at_k,
                 scalars["num_images"], evaluation.seconds, url)
        return evaluation

    def run(self, once: bool = False, until_step: int | None = None, only: str | None = None) -> list[Evaluation]:
        """Poll until stopped (or, with `once`, a single pass; with `until_step`, until that step is evaluated)."""
        results = []
        while True:
            for ref in self.pending(only):
                try:
                    results.append(self.evaluate(ref))
                except StorageError as exc:
                    log.warning("checkpoint %s vanished while being evaluated (retention?): %s", ref.url, exc)
            done = {r["step"] for r in read_records(self.reports_dir, self.storage)}
            if once or (until_step is not None and any(step >= until_step for step in done)):
                return results
            time.sleep(self.poll_seconds)

    def _classes(self, config: Config) -> tuple[list[str], np.ndarray]:
        prefix = config.data.train or self.eval_prefix or config.data.eval
        try:
            classes = read_classes(prefix, read_manifest(prefix, self.storage), self.storage)
        except (StorageError, ValueError) as exc:
            log.warning("class names unavailable (%s); using ids", exc)
            n = config.model.num_classes
            return [str(i) for i in range(n)], np.zeros(n)
        return [c.name for c in classes], np.array([c.train_frequency for c in classes], dtype=np.float64)

    def _tensorboard(self, evaluation: Evaluation) -> None:
        if "://" in self.run_dir and not self.run_dir.startswith("file://"):
            return  # TensorBoard writes local files; remote runs read map100.jsonl / report.html instead
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(self.run_dir.removeprefix("file://")) / "tensorboard" / "eval"
        with SummaryWriter(str(directory)) as writer:
            for name, value in evaluation.result.scalars().items():
                writer.add_scalar(f"eval/{name}", value, global_step=evaluation.samples_seen or evaluation.step)


def evaluate_latest(config: Config, workers: int = 1) -> str:
    """Evaluate the run's checkpoints that its report lacks (at least the final one); a one-line summary."""
    watcher = CheckpointWatcher(config.run_dir, eval_prefix=config.data.eval, storage=config.storage, workers=workers)
    watcher.run(once=True)
    records = read_records(watcher.reports_dir, config.storage)
    if not records:
        return f"no complete checkpoint under {config.run_dir} to evaluate"
    last, k = records[-1], config.eval.k
    report = join_url(watcher.reports_dir, "report.html")
    return (f"MAP@{k} {100 * last[f'map@{k}']:.2f}% (per image {100 * last[f'image_map@{k}']:.2f}%) at step "
            f"{last['step']} on {last['num_images']:.0f} images; report: {report}")
