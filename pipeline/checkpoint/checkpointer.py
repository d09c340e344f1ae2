"""The trainer's checkpointer: when to save, what a checkpoint holds, background upload, retention and restore.

A checkpoint holds every component's `state_dict()` (torchtitan's manner): the train state (model, EMA, optimizer,
counters), and per rank the data position (`ShardStream`) and the random generators (`RankRng`), gathered across
ranks in rank order (through the `gather` the training loop passes: its collective). Rank 0 writes it through
`pipeline.checkpoint.format`, the format's one owner (file names, COMMIT publication, layout); every rank restores
from the newest committed one.

Background saving: `save()` snapshots the state to CPU tensors synchronously (so training may mutate the live
tensors right away), then serialises and uploads on a `BackgroundWorker`; `wait()` waits for it and raises its
error in the training loop. At most one upload is in flight; a second save waits for the first (bounded memory).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from pipeline.background import BackgroundWorker
from pipeline.checkpoint.format import (
    CheckpointRef,
    checkpoint_url,
    committed_checkpoints,
    delete_checkpoint,
    is_checkpoint_step,
    latest_checkpoint,
    read_checkpoint,
    step_dirs,
    write_checkpoint,
)
from pipeline.config import Config, StorageConfig
from pipeline.storage import outlasting_outages, remove

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def snapshot(tree: Any) -> Any:
    """A deep copy of a state tree with every tensor detached and cloned to CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(snapshot(v) for v in tree)
    return tree


class Checkpointer:
    """A run's checkpoints: saved by rank 0 at the configured steps, with retention; restored on every rank.

    `train_state`, `loader` and `rng` are the components `restore` and `maybe_save` act on (the loop's); `save`,
    `wait` and `latest` alone need none of them. `rank`, `device` and `gather` (every rank's value in rank order,
    collective: `pipeline.train.ranks.gather_ranks`) say where this process sits; the defaults are one process.
    """

    def __init__(self, run_dir: str, config: Config, storage: StorageConfig | None = None, *, rank: int = 0,
                 device: torch.device | str = "cpu", gather: Callable[[Any], list] = lambda value: [value],
                 train_state: Stateful | None = None, loader: Stateful | None = None,
                 rng: Stateful | None = None) -> None:
        self.run_dir = run_dir
        self.config = config
        self.storage = storage
        self.rank, self.device, self.gather = rank, device, gather
        self.train_state, self.loader, self.rng = train_state, loader, rng
        self._upload: BackgroundWorker | None = None  # the in-flight background save's
        self.last_save_stall_s = 0.0  # time save() blocked the training loop
        self.last_upload_s = 0.0
        self.saved_step: int | None = None  # the step of the checkpoint restored or saved last
        self.committed_step: int | None = None  # the step this writer committed last (set by the upload thread)
        self._reported_step: int | None = None

    def is_checkpoint_step(self, step: int) -> bool:
        """Whether a checkpoint is saved after `step`: every `checkpoint.every_steps`, and at the last step."""
        return is_checkpoint_step(step, self.config.checkpoint.every_steps, self.config.train.total_steps)

    def restore(self) -> CheckpointRef | None:
        """Load the run's latest complete checkpoint into the components; None (nothing loaded) when there is none."""
        ref = self.latest()
        if ref is None:
            return None
        checkpoint = read_checkpoint(ref.url, self.storage, map_location=self.device)
        self.train_state.load_state_dict(checkpoint["state"])
        if checkpoint["loader"] is not None:
            self.loader.load_state_dict(checkpoint["loader"]["ranks"])
        if checkpoint["state"].get("rng") is not None:
            self.rng.load_state_dict(checkpoint["state"]["rng"])
        self.saved_step = ref.step
        return ref

    def maybe_save(self, step: int, extra: dict[str, Any] | None = None, *, now: bool = False) -> bool:
        """At a checkpoint step (or `now`, unless `step` is saved already), gather the per-rank states and (rank 0)
        save; whether it saved.

        Every rank must call this after every step: the gathering is collective."""
        if not (self.is_checkpoint_step(step) or (now and step != self.saved_step)):
            return False
        self.saved_step = step  # on every rank: they must agree on the next `now`
        ranks = self.gather((self.loader.state_dict(), self.rng.state_dict()))
        if self.rank == 0:
            self.save(step, {**self.train_state.state_dict(), "rng": [rng for _, rng in ranks]},
                      {"ranks": [loader for loader, _ in ranks]}, extra=extra)
        return True

    def save(self, step: int, state: dict[str, Any], loader_state: dict | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Publish checkpoint `step`; in the background if `checkpoint.background` (call `wait()` before exit).

        `extra` goes into the COMMIT record (the loop's: the latest metrics and the class fingerprint)."""
        start = time.perf_counter()
        self.wait()
        cpu_state = snapshot(state)
        job = lambda: self._write(step, cpu_state, loader_state, extra or {})  # noqa: E731
        if self.config.checkpoint.background:
            self._upload = BackgroundWorker(f"checkpoint-{step}")  # one per save, ended by wait(): no idle thread
            self._upload.submit(job)
        else:
            job()
        self.last_save_stall_s = time.perf_counter() - start

    def take_unreported(self) -> str | None:
        """The URL of the checkpoint this writer committed since the last call, if any (rank 0 only: the writer);
        for Ray Train's report, so Ray knows every committed checkpoint once."""
        step = self.committed_step
        if step is None or step == self._reported_step:
            return None
        self._reported_step = step
        return checkpoint_url(self.run_dir, step)

    def wait(self) -> None:
        """Block until the in-flight upload finishes; re-raise its error here, in the training loop."""
        if self._upload is None:
            return
        try:
            self._upload.close()  # a signal's SystemExit or KeyboardInterrupt leaves it in flight, to wait for again
        except Exception as error:  # the upload's
            self._upload = None
            raise RuntimeError(f"checkpoint upload to {self.run_dir} failed: {error}") from error
        self._upload = None

    def _write(self, step: int, state: dict, loader_state: dict | None, extra: dict) -> None:
        start = time.perf_counter()
        log.info("checkpoint step %d: writing to %s", step, checkpoint_url(self.run_dir, step))
        commit = outlasting_outages(  # idempotent: the files again, COMMIT last
            lambda: write_checkpoint(self.run_dir, step, state, self.config, loader_state, extra, self.storage),
            what=f"checkpoint step {step}", storage=self.storage)
        self.last_upload_s = time.perf_counter() - start
        self.committed_step = step
        log.info("checkpoint step %d published to %s (%.1f MB in %.1fs)", step, checkpoint_url(self.run_dir, step),
                 commit["state_bytes"] / 1e6, self.last_upload_s)
        self._apply_retention()

    def _apply_retention(self) -> None:
        keep_last, keep_every = self.config.checkpoint.keep_last, self.config.checkpoint.keep_every
        refs = committed_checkpoints(self.run_dir, self.storage)
        committed = {ref.step for ref in refs}
        for ref in step_dirs(self.run_dir, self.storage):
            # Only this writer publishes checkpoints and none is in flight now: an uncommitted directory is what
            # a crashed writer left behind.
            if ref.step not in committed:
                remove(ref.url, self.storage, recursive=True)
                log.info("removed abandoned partial checkpoint %s", ref.url)
        for ref in refs[:-keep_last]:
            if keep_every and ref.step % keep_every == 0:
                continue
            delete_checkpoint(ref.url, self.storage)
            log.info("retention: removed %s", ref.url)

    def latest(self) -> CheckpointRef | None:
        return latest_checkpoint(self.run_dir, self.storage)
