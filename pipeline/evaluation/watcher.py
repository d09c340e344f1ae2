"""The checkpoint-watching evaluator: every new complete checkpoint of a run -> one MAP@100 report line.

With each line it writes the checkpoint's per-class decision thresholds (`reports/thresholds/step-NNNNNNNNN.json`,
`pipeline.models.thresholds`), before the line, so a step on record always has them.

Idempotent and resumable by construction: the set of evaluated steps is read back from `reports/map100.jsonl`
before each poll, so a restarted evaluator skips what is done; only committed checkpoints (COMMIT marker present)
are ever listed, so partial ones are never read. It ends by itself once the run's final checkpoint (at the
`train.total_steps` saved with it) is evaluated, saying so, or with `until_step` once that step is. One evaluator
per run is expected (the report is rewritten, not
appended to: see `append_record`). Steps already reported with other eval settings are not evaluated again, with a
warning. An evaluator that lags behind training can lose checkpoints to retention: those deleted before it got to
them (inferred from the newest checkpoint's `checkpoint.every_steps`), or while it read them, are named in a
warning. `--once` on a run that does not exist is refused (`NoSuchRunError`, naming the runs beside it); with
nothing to evaluate it says why (`nothing_to_evaluate`).

With `tracking.backend` set (the evaluator's, else the one training ran with), each evaluation's metrics go to the
run's tracked run at its training step (`eval/map_at_100`, ..., `eval/tail_map_at_100`, and the baselines), with
`report.html` as the file `reports/report.html`; the tracker is opened at the first evaluation and closed when
`run` returns.

A pass that fails on an unreachable store is tried again for up to `storage.outage_budget_s` (a long-running
evaluator outlasts an outage, as training does); the shard reads of the pass, in this process, share that budget
(`pipeline.storage.retries`: budgets compose).

Beside training (`start_background_evaluator`, `eval.with_training`): the watcher runs as a Ray actor, so one `ray job
submit` yields reports. The actor is named after the run (`evaluator-<run.name>`) and reused if it exists, so a
resubmitted training job does not start a second evaluator. When training ends, the job wakes it
(`BackgroundEvaluator.finish`) to look at once instead of at its next poll. It asks for `ray_options`: 1 CPU, 1 GPU
with `cluster.use_gpu`, and the custom `eval.resources`; on the infra/ clusters set `eval.resources={evaluator: 1}`,
which only the evaluator node type offers, or its GPU request may take a training node's GPU.
"""

from __future__ import annotations

import difflib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoint.format import (
    CheckpointRef,
    committed_checkpoints,
    is_committed,
    scheduled_steps,
    step_dirs,
)
from pipeline.cluster import connect_ray
from pipeline.config import Config, validate
from pipeline.evaluation.class_weights import frequency_classes
from pipeline.evaluation.evaluator import (
    Evaluation,
    checkpoint_config,
    eval_settings,
    evaluate_checkpoint,
    ray_options,
)
from pipeline.evaluation.frequency_thirds import THIRDS
from pipeline.evaluation.report import append_record, headline, read_records, write_report
from pipeline.models.thresholds import thresholds_url, write_thresholds
from pipeline.storage import StorageError, exists, is_local_url, join_url, list_dir, local_path, outlasting_outages
from pipeline.tracking import Tracker, start_tracking

log = logging.getLogger(__name__)


class NoSuchRunError(ValueError):
    """Nothing exists at the run directory: a typo in run.name / run.storage, or a run never started."""


class CheckpointWatcher:
    """Evaluates a run's checkpoints as they appear; `run(once=True)` evaluates what is there and returns.

    `config` is the evaluator's own config (eval settings, storage, data.eval, ...: `resolve_config`); None
    evaluates each checkpoint with its saved config alone.
    """

    def __init__(self, run_dir: str, config: Config | None = None, *, workers: int = 1,
                 tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.config = config
        self.storage = config.storage if config is not None else None
        self.reports_dir = join_url(run_dir, "reports")
        self.workers = workers
        self.poll_seconds = (config or Config()).eval.poll_seconds
        self.tensorboard = tensorboard
        self._warned: set[tuple[str, int]] = set()  # (why, step): each step is named once per watcher
        self._schedule: tuple[int, Config] | None = None  # (newest checkpoint step, its saved config)
        self._tracker: Tracker | None = None  # opened at the first evaluation, with its resolved config
        self._woken = threading.Event()

    def wake(self) -> None:
        """Look again now rather than at the next poll (training has just written its final checkpoint)."""
        self._woken.set()

    def require_run(self, only: str | None = None) -> None:
        """Raise `NoSuchRunError` if nothing exists at the run directory (a started run writes <run>/workers/ before
        its first checkpoint), naming the closest runs beside it; or if checkpoint `only` is not committed."""
        if exists(self.run_dir, self.storage):
            if only is not None and not is_committed(only, self.storage):
                raise NoSuchRunError(f"{only}: not a committed checkpoint of {self.run_dir} (missing, or its COMMIT "
                                     "marker is not written yet)")
            return
        parent, _, name = self.run_dir.rstrip("/").rpartition("/")
        runs = [url.rstrip("/").rsplit("/", 1)[-1] for url in list_dir(parent, self.storage)] if parent else []
        close = difflib.get_close_matches(name, runs, n=3, cutoff=0.5)
        hint = (f"did you mean run.name={' or '.join(close)}? " if close else
                f"runs there: {', '.join(runs[:8])}{' ...' if len(runs) > 8 else ''}; " if runs else "")
        raise NoSuchRunError(f"no run at {self.run_dir} (nothing there, so no checkpoints to evaluate); {hint}"
                             "check run.name and run.storage (the run directory is <run.storage>/<run.name>)")

    def nothing_to_evaluate(self, only: str | None = None) -> str:
        """Why a single pass evaluated nothing: one line naming the run and its checkpoints."""
        if only is not None:
            return f"{only}: already evaluated (in {self.reports_dir}/map100.jsonl); nothing new to evaluate"
        refs = committed_checkpoints(self.run_dir, self.storage)
        if not refs:
            partial = len(step_dirs(self.run_dir, self.storage))
            return (f"{self.run_dir}: no committed checkpoint yet ({partial} being written); nothing to evaluate"
                    if partial else f"{self.run_dir}: no checkpoint yet; nothing to evaluate")
        return (f"{self.run_dir}: all {len(refs)} committed checkpoints (steps {_steps([r.step for r in refs])}) are "
                f"already in {self.reports_dir}/map100.jsonl; nothing new to evaluate")

    def pending(self, only: str | None = None) -> list[CheckpointRef]:
        """Committed checkpoints without a report line (only the one at URL `only`, if given)."""
        records = read_records(self.reports_dir, self.storage)
        done = {r["step"] for r in records}
        refs = committed_checkpoints(self.run_dir, self.storage)
        self._warn_removed(done, refs)
        self._warn_other_settings(records)
        refs = [ref for ref in refs if ref.step not in done]
        if only is not None:
            refs = [ref for ref in refs if ref.url.rstrip("/") == only.rstrip("/")]
        return refs

    def _unnamed(self, why: str, steps: list[int]) -> list[int]:
        """The steps not yet named for `why`, now marked as named."""
        fresh = [step for step in steps if (why, step) not in self._warned]
        self._warned.update((why, step) for step in fresh)
        return fresh

    def _warn_removed(self, done: set[int], refs: list[CheckpointRef]) -> None:
        """Name the checkpoints that retention removed before they were evaluated (the evaluator lags behind).

        Expected steps come from the newest checkpoint's schedule (`checkpoint.every_steps`): after a resume with
        another schedule, steps of the new schedule that the old one never wrote are named too (a warning only).
        """
        if not refs:
            return
        if self._schedule is None or self._schedule[0] != refs[-1].step:  # config.yaml read once per checkpoint
            try:
                self._schedule = (refs[-1].step, checkpoint_config(refs[-1].url, self.storage))
            except StorageError:
                return  # removed meanwhile; the next poll looks again
        saved = self._schedule[1]
        keep = saved.checkpoint
        expected = scheduled_steps(keep.every_steps, saved.train.total_steps, refs[-1].step)
        present = {ref.step for ref in refs}
        removed = self._unnamed("removed", [step for step in expected if step not in done and step not in present])
        if removed:
            log.warning("%d checkpoint(s) were removed by retention before being evaluated, so map100.jsonl has no "
                        "line for them: steps %s (checkpoint.keep_last=%d, keep_every=%d; keep more, or evaluate "
                        "faster with --workers)", len(removed), _steps(removed), keep.keep_last, keep.keep_every)

    def _warn_other_settings(self, records: list[dict]) -> None:
        """Name reported steps whose eval settings differ from this evaluator's: they are not evaluated again."""
        if self.config is None:
            return
        wanted = eval_settings(self.config)
        differing = [r["step"] for r in records if any(r.get(key, value) != value for key, value in wanted.items())]
        other = self._unnamed("settings", differing)
        if other:
            log.warning("%s/map100.jsonl already reports step(s) %s with other eval settings than %s; not evaluating "
                        "them again (remove their lines to re-evaluate)", self.reports_dir, _steps(other), wanted)

    def evaluate(self, ref: CheckpointRef) -> Evaluation:
        """Evaluate one checkpoint, record it, regenerate the report."""
        evaluation = evaluate_checkpoint(ref.url, self.config, workers=self.workers, reports_dir=self.reports_dir)
        names, frequency = self._classes(evaluation.config)
        if evaluation.thresholds is not None:  # before the record: a step on record has its thresholds
            write_thresholds(thresholds_url(self.run_dir, evaluation.step),
                             evaluation.thresholds.as_class_thresholds(names, evaluation.step), self.storage)
        append_record(self.reports_dir, evaluation.record(), self.storage)
        url = write_report(self.reports_dir, evaluation, names, frequency, self.storage)
        if self.tensorboard:
            self._tensorboard(evaluation)
        self._track(evaluation, url)
        summary = summarize(evaluation.record(), orientation=evaluation.config.eval.orientation)
        log.info("step %d: %s; %d images in %.1fs -> %s", evaluation.step, summary, evaluation.result.num_images,
                 evaluation.seconds, url)
        return evaluation

    def run(self, once: bool = False, until_step: int | None = None, only: str | None = None) -> list[Evaluation]:
        """Poll until the run's final checkpoint is evaluated (`finished_at`), or, with `until_step`, until a step at
        or after it is; with `once`, a single pass. A watcher that ran until stopped by hand outlived every run."""
        results: list[Evaluation] = []
        if not once and not exists(self.run_dir, self.storage):
            log.info("waiting for checkpoints of %s: nothing there yet (if training is running, check run.name and "
                     "run.storage)", self.run_dir)
        try:
            while True:
                # A pass is repeatable (what is done is read back from the report), so an outage of the store
                # costs a wait of up to storage.outage_budget_s, not the evaluator, as for training's checkpoints.
                done = outlasting_outages(lambda: self._poll(only, results), what=f"evaluating {self.run_dir}",
                                          storage=self.storage)
                if once or (until_step is not None and any(step >= until_step for step in done)):
                    return results
                if until_step is None and (final := self.finished_at(done)) is not None:
                    log.info("%s finished: its final checkpoint (step %d = train.total_steps) is evaluated; the "
                             "evaluator stops (to follow a run resumed with more steps, start it with --until-step N)",
                             self.run_dir, final)
                    return results
                self._woken.wait(self.poll_seconds)
                self._woken.clear()
        finally:
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None

    def finished_at(self, done: set[int]) -> int | None:
        """The final step of a finished run once its checkpoint is in `done`, else None. Training's last checkpoint
        is at `train.total_steps` of the config saved with it (the COMMIT rule: only committed ones are listed);
        `pending` read the newest one's config this pass."""
        if self._schedule is None:
            return None
        step, saved = self._schedule
        return step if step >= saved.train.total_steps and step in done else None

    def _poll(self, only: str | None, results: list[Evaluation]) -> set[int]:
        """One pass: evaluate what is pending (appended to `results` one by one), then the steps on record."""
        self._evaluate_pending(only, results)
        return {r["step"] for r in read_records(self.reports_dir, self.storage)}

    def _evaluate_pending(self, only: str | None, results: list[Evaluation]) -> None:
        for ref in self.pending(only):
            try:
                results.append(self.evaluate(ref))
            except StorageError as exc:
                if is_committed(ref.url, self.storage):
                    raise  # the checkpoint is there: the eval data or the store is what failed
                self._unnamed("removed", [ref.step])  # named here already
                log.warning("checkpoint %s vanished while being evaluated (retention?): %s", ref.url, exc)

    def _classes(self, config: Config) -> tuple[list[str], np.ndarray]:
        """Class names and training frequencies for the report's plots (ids and zeros when unreadable)."""
        try:
            classes = frequency_classes(config)
        except (StorageError, ValueError) as exc:
            log.warning("class names unavailable (%s); using ids", exc)
            n = config.model.num_classes
            return [str(i) for i in range(n)], np.zeros(n)
        return [c.name for c in classes], np.array([c.train_frequency for c in classes], dtype=np.float64)

    def _tensorboard(self, evaluation: Evaluation) -> None:
        if not is_local_url(self.run_dir):
            return  # TensorBoard writes local files; remote runs read map100.jsonl / report.html instead
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(local_path(self.run_dir)) / "tensorboard" / "eval"
        step = evaluation.samples_seen or evaluation.step
        with SummaryWriter(str(directory)) as writer:
            for name, value in eval_scalars(evaluation).items():
                writer.add_scalar(name, value, global_step=step)

    def _track(self, evaluation: Evaluation, report_url: str) -> None:
        """The evaluation's scalars (at its training step, beside training's) and report into the tracked run."""
        if self._tracker is None:
            self._tracker = start_tracking(self.run_dir, evaluation.config, role="eval")
        self._tracker.log_scalars(evaluation.step, {**eval_scalars(evaluation),
                                                    "eval/samples_seen": evaluation.samples_seen})
        self._tracker.log_artifact(report_url, "reports/report.html")


# Fields of a map100.jsonl line that say what was evaluated and how, not what was measured.
_NOT_MEASURED = frozenset({"step", "samples_seen", "checkpoint", "time", "baselines", *eval_settings(Config())})


def eval_scalars(evaluation: Evaluation) -> dict[str, float]:
    """`eval/<name>` for every number the evaluation's `map100.jsonl` line records (MAP@K and its companions, the
    MAP@K of the frequency thirds and their sizes, the mean F1 at the decision thresholds, the time it took),
    `eval/<prior|random>_baseline/<metric>` for its baselines. Derived from the line itself, so a metric the
    evaluator records is never missing from TensorBoard or the tracked run (`threshold_mean_f1` was, while it was
    listed by hand); a third without evaluated classes is left out."""
    scalars = {f"eval/{name}": float(value) for name, value in evaluation.record().items()
               if name not in _NOT_MEASURED and _is_number(value)}
    for baseline, scores in (evaluation.baselines or {}).items():
        scalars.update({f"eval/{baseline}_baseline/{name}": value for name, value in scores.items()
                        if _is_number(value)})
    return scalars


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def evaluate_latest(config: Config, workers: int = 1) -> str:
    """Evaluate the run's checkpoints that its report lacks (at least the final one); a one-line summary."""
    watcher = CheckpointWatcher(config.run_dir, config, workers=workers)
    watcher.run(once=True)
    records = read_records(watcher.reports_dir, config.storage)
    if not records:
        return f"no complete checkpoint under {config.run_dir} to evaluate"
    last = records[-1]
    report = join_url(watcher.reports_dir, "report.html")
    where = f"at step {last['step']} on {last['num_images']:.0f} images"
    return f"{summarize(last, config.eval.k, config.eval.orientation)} {where}; report: {report}"


def summarize(record: dict, default_k: int = 100, orientation: str = "class") -> str:
    """One line of a `map100.jsonl` record: MAP@K per class and per image, the headline (`eval.orientation`)
    first, each next to its class-prior and random baselines on the same evaluation set, so that nobody reads a
    number without its floor."""
    k = record.get("k", default_k)  # lines written before k was recorded: assume this config's
    baselines = record.get("baselines")

    def one(key: str, label: str) -> str:
        text = f"{label} {100 * record[key]:.2f}%"
        if baselines:
            text += f" (class prior {100 * baselines['prior'][key]:.2f}%, random {100 * baselines['random'][key]:.2f}%)"
        return text

    other = (f"image_map@{k}", "per image") if orientation == "class" else (f"map@{k}", "per class")
    return f"{one(*headline(k, orientation))}; {one(*other)}{summarize_thirds(record, k)}"


def summarize_thirds(record: dict, k: int) -> str:
    """"; by training frequency head/middle/tail 70.1% / 30.2% / 10.3% (39 / 38 / 38 classes; class prior ...)"
    from a record with the frequency thirds (`pipeline.evaluation.frequency_thirds`); "" for older records."""
    if f"head_map@{k}" not in record:
        return ""

    def percents(scores: dict) -> str:
        return " / ".join("n/a" if scores.get(f"{t}_map@{k}") is None else f"{100 * scores[f'{t}_map@{k}']:.1f}%"
                          for t in THIRDS)

    prior = (record.get("baselines") or {}).get("prior")
    floor = f"; class prior {percents(prior)}" if prior and f"head_map@{k}" in prior else ""
    counts = " / ".join(str(record[f"{t}_classes"]) for t in THIRDS)
    return f"; by training frequency head/middle/tail {percents(record)} ({counts} classes{floor})"


def _steps(steps: list[int], shown: int = 10) -> str:
    more = f" and {len(steps) - shown} more" if len(steps) > shown else ""
    return ", ".join(map(str, steps[:shown])) + more


# Beside training: the watcher as a Ray actor --------------------------------------------------------------------------

class _Evaluator:
    def __init__(self, raw_config: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = validate(raw_config)
        self.watcher = CheckpointWatcher(self.config.run_dir, self.config)

    def run(self, until_step: int) -> int:
        return len(self.watcher.run(until_step=until_step))

    def wake(self) -> None:
        self.watcher.wake()


# `wake` runs in a concurrency group of its own, beside a `run` in progress; `run` calls (a resubmitted job's
# reuse the actor) still run one at a time in the default group.
_WAKE_GROUP = "wake"


class BackgroundEvaluator:
    """The evaluator actor beside training, and its `run` call."""

    def __init__(self, actor: Any, running: Any) -> None:
        self.actor, self.running = actor, running

    def finish(self) -> int:
        """Training has ended: the evaluator looks at once (not up to `eval.poll_seconds` later) and this returns
        once the final checkpoint is reported, with the number of checkpoints it evaluated."""
        import ray

        self.actor.wake.options(concurrency_group=_WAKE_GROUP).remote()
        return ray.get(self.running)


def start_background_evaluator(config: Config) -> BackgroundEvaluator:
    """Start (or find) the run's evaluator actor and set it polling until the final step is evaluated."""
    import ray

    if config.data.eval is None:
        raise ValueError("eval.with_training needs data.eval (the URL of the densely labelled evaluation set)")
    connect_ray(config)  # the same connection (forwarded environment) that training's launch() then reuses
    actor_class = ray.remote(concurrency_groups={_WAKE_GROUP: 1}, **ray_options(config))(_Evaluator)
    actor = actor_class.options(name=f"evaluator-{config.run.name}", get_if_exists=True).remote(
        config.model_dump(mode="json"))
    log.info("evaluator-%s watches %s/checkpoints", config.run.name, config.run_dir)
    return BackgroundEvaluator(actor, actor.run.remote(config.train.total_steps))
