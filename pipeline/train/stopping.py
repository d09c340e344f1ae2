"""Stopping every rank together at a step boundary: on a preemption notice (a Ray node drain or SIGTERM) or on bad data.

A DDP step is a collective, so no rank may leave the loop alone: a rank that stops while its peers enter the next
gradient all-reduce leaves them blocked until a timeout. Each step therefore starts with a tiny agreement, an
all-reduce (MAX) of every rank's stop request, after the batch is fetched and before the forward pass:

- **Preemption.** Two notices, one reaction:
  - *Ray's drain* (the autoscaler reclaiming a spot node, KubeRay's preStop hook, `ray drain-node`): Ray Train's
    preemption watcher sees the node drain and `ray.train.get_preemption_info()` returns it. That call is a barrier
    through Ray's synchronisation actor (milliseconds), so it is not made every step: the agreement carries a
    second flag, "ask Ray now", raised every `cluster.preemption_poll_s`, and every rank then calls it at the same
    step. Ray's own watcher polls the drains at the same interval.
  - *SIGTERM* to a worker process (a cloud that signals processes, an operator): the handler only notes it
    (`pipeline.train.faults.PreemptionNotice`, where both meanings of SIGTERM are told).
  At the next agreement every rank learns of it, finishes the step whose batch it holds (the loader counts that
  batch as handed out), and rank 0 checkpoints and commits that step. Then every rank waits for the others at a
  barrier (`commit_barrier`): no rank leaves before the commit exists, since Ray ends the whole group as soon as
  one rank stops. Then each raises `Preempted`, which Ray Train charges to `max_preemption_failures`
  (`pipeline.train.ray_internals`): the group restarts, on capacity that is not draining, from that checkpoint, so
  no completed step is redone.
- **Bad data.** `BadDataError` is raised by one rank's loader; its peers learn of it at the same boundary and raise
  it too, with that rank's message, so the launcher records it once and the job ends (it is deterministic: a retry
  would read the same shards).

Signal handlers can only be installed from a process's main thread. Ray Train runs the training function in a
thread of the worker actor, so the launcher installs the handler through its backend's `on_training_start`, which
runs on each worker's main thread. Python runs a handler when that thread next executes Python code. `train()`
called directly in a single process leaves signals alone.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data.loading import BadDataError
from pipeline.train.faults import PreemptionNotice, preemption_noticed
from pipeline.train.ranks import WorkerContext, gather_ranks
from pipeline.train.ray_internals import Preempted

log = logging.getLogger(__name__)

class StopReason(enum.IntEnum):
    """Why the ranks stop; the agreement takes the largest, so a deterministic stop outranks a preemption."""

    NONE = 0
    PREEMPTED = 1
    BAD_DATA = 2


# What `ray.train.get_preemption_info()` returns: a `ray.train.PreemptionInfo` or None. Any object with
# `preempted_ranks` and `deadline_ms` does.
PreemptionPoll = Callable[[], Any]


class StopAgreement:
    """The per-step agreement among ranks. `agree()` is collective: every rank calls it once per step.

    `poll_drains` (Ray Train workers: `ray.train.get_preemption_info`) is called on every rank at the same steps,
    about every `poll_interval_s` (the first rank whose clock says so asks for all, through the all-reduce), or
    less often where a call costs more than `poll_budget` of that interval (`cluster.preemption_poll_budget`:
    polls measured 9-39 ms each on a loaded 2-core test cluster); it is a barrier too."""

    def __init__(self, ctx: WorkerContext, poll_drains: PreemptionPoll | None = None, *,
                 poll_interval_s: float = 0.0, poll_budget: float = 1.0) -> None:
        """Notices count from now until `close()`."""
        self.ctx = ctx
        self._bad_data: BadDataError | None = None
        self._group = None
        self._poll_drains = poll_drains
        self._poll_interval_s = poll_interval_s
        self._poll_budget = poll_budget
        self._last_poll = self._opened = time.monotonic()
        self._polls, self._poll_s = 0, 0.0  # how often Ray was asked, and how long that took in all
        self.notice: str | None = None  # what the agreed notice was, once there is one (for the log and COMMIT)
        if ctx.world_size > 1 and dist.get_backend() != "gloo":
            # Agree on the CPU over gloo: a device all-reduce would add a host-device sync to every step.
            self._group = dist.new_group(backend="gloo")
        self._sigterm = PreemptionNotice.installed()  # None: train() called directly, signals left alone
        if self._sigterm is not None:
            self._sigterm.training.set()

    def close(self) -> None:
        if self._sigterm is not None:
            self._sigterm.training.clear()
        if self._polls and self.ctx.rank == 0:
            log.info("asked Ray Train for node drains %d times, %.1f ms each (%.3f%% of the training time; "
                     "every %.1f s)", self._polls, 1000 * self._poll_s / self._polls,
                     100 * self._poll_s / max(time.monotonic() - self._opened, 1e-9), self._poll_interval_s)

    def bad_data(self, error: BadDataError) -> None:
        """This rank's loader gave up; the ranks stop together at `agree()`."""
        self._bad_data = error

    def agree(self) -> StopReason:
        """Every rank's requests combined; raises `BadDataError` (on every rank, with the reporting rank's message)
        when one rank's data failed. A preemption is returned: the caller checkpoints, waits at `commit_barrier()`,
        then raises `preempted()`."""
        local = StopReason.BAD_DATA if self._bad_data else (
            StopReason.PREEMPTED if preemption_noticed() else StopReason.NONE)
        poll = self._poll_drains is not None and time.monotonic() - self._last_poll >= self._poll_interval_s
        flags = torch.tensor([int(local), int(poll)], dtype=torch.int32)
        if self.ctx.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        reason, poll = StopReason(int(flags[0])), bool(flags[1])
        if reason is StopReason.BAD_DATA:
            messages = gather_ranks(str(self._bad_data) if self._bad_data else None, self.ctx)
            rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
            raise BadDataError(message if rank == self.ctx.rank else f"(reported by rank {rank}) {message}")
        if poll:
            start = time.monotonic()
            drain = self._poll_drains()  # every rank at this step: Ray's barrier
            self._last_poll = time.monotonic()
            self._polls, self._poll_s = self._polls + 1, self._poll_s + self._last_poll - start
            self._poll_interval_s = max(self._poll_interval_s, self._poll_s / self._polls / self._poll_budget)
            if drain is not None and reason is StopReason.NONE:
                reason, self.notice = StopReason.PREEMPTED, describe_drain(drain)
        if reason is StopReason.PREEMPTED and self.notice is None:
            self.notice = "SIGTERM"
        return reason

    def commit_barrier(self) -> None:
        """Every rank waits here until rank 0 has committed the preemption checkpoint (it arrives after its commit)."""
        if self.ctx.world_size > 1:
            dist.barrier(group=self._group)

    def preempted(self, step: int, checkpoint_url: str | None) -> Preempted:
        """The error every rank raises once the preemption checkpoint is committed."""
        where = f"checkpoint {checkpoint_url}" if checkpoint_url else "its latest checkpoint"
        return Preempted(f"preempted ({self.notice}) after step {step}: the run resumes from {where}", step=step)


def describe_drain(drain: Any) -> str:
    """One phrase for a Ray drain notice: which ranks' nodes go, and how long until Ray's deadline."""
    deadline = "no deadline given" if not drain.deadline_ms else \
        f"deadline in {drain.deadline_ms / 1000 - time.time():.0f} s"
    return f"node drain of ranks {list(drain.preempted_ranks)}, {deadline}"
