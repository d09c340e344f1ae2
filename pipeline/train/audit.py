"""`train.log_samples`: the keys each rank trained on, written out at every checkpoint step (an audit trail).

`<run>/samples/rank-RRRRR-step-SSSSSSSSS.json` holds the keys a rank trained on since its previous file. Each file is
written, on every rank, before that step's checkpoint commits (the loop records before it saves), so a step's keys
are on record whenever its checkpoint is: after a resume, the files up to the resumed checkpoint list every sample
trained on exactly once (the tests use it to prove that a killed worker's run keeps the loader's promise). Files of
later steps, written before a failure by an attempt whose checkpoint never committed, are removed when the run
resumes (`forget_after`): the steps are trained again, possibly by fewer ranks (elastic training), whose files
would not overwrite the old ranks'.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pipeline.config import Config
from pipeline.data.loading import Batch
from pipeline.storage import join_url, list_dir, remove, write_bytes
from pipeline.train.ranks import WorkerContext, barrier


class SampleAudit:
    """Collects this rank's trained keys; writes them at the steps `write_at` accepts (the checkpoint steps)."""

    def __init__(self, config: Config, ctx: WorkerContext, write_at: Callable[[int], bool]) -> None:
        self.enabled = config.train.log_samples
        self.samples_dir = join_url(config.run_dir, "samples")
        self.storage = config.storage
        self.ctx = ctx
        self.write_at = write_at
        self._keys: list[str] = []  # since the last file

    def forget_after(self, step: int) -> None:
        """Rank 0, before the first step of an attempt: remove the files of steps after `step` (the resumed one).

        No rank can write a file of this attempt before rank 0 has done it: they all wait for it in the first
        step's gradient all-reduce."""
        if not self.enabled or self.ctx.rank != 0:
            return
        for url in list_dir(self.samples_dir, self.storage):
            if int(url.rsplit("-", 1)[-1].removesuffix(".json")) > step:
                remove(url, self.storage)

    def record(self, step: int, batch: Batch, write: bool = False) -> None:
        """Note the batch's valid keys as trained at `step`; at a checkpoint step (or `write`: an unscheduled
        checkpoint follows), write them out (collective)."""
        if not self.enabled:
            return
        self._keys += [key for key, ok in zip(batch.keys, batch.valid.tolist(), strict=True) if ok]
        if write or self.write_at(step):
            name = f"rank-{self.ctx.rank:05d}-step-{step:09d}.json"
            write_bytes(join_url(self.samples_dir, name), json.dumps(self._keys).encode(), self.storage)
            self._keys = []
            barrier(self.ctx)
