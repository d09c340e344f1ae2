"""Stopping every rank together at a step boundary: on a preemption notice (SIGTERM) or on bad data.

A DDP step is a collective, so no rank may leave the loop alone: a rank that stops while its peers enter the next
gradient all-reduce leaves them blocked until a timeout. Each step therefore starts with a tiny agreement, an
all-reduce (MAX) of every rank's stop request, after the batch is fetched and before the forward pass:

- **Preemption.** Spot capacity is reclaimed with SIGTERM and a grace period (30 s to 2 min on the big clouds). The
  handler only notes it; at the next agreement every rank learns of it, finishes the step whose batch it holds (the
  loader counts that batch as handed out), checkpoints and commits that step, and raises `Preempted`, which Ray
  Train treats as a worker failure: the group restarts, on the remaining or replacement capacity, from that
  checkpoint, so no completed step is redone.
- **Bad data.** `BadDataError` is raised by one rank's loader; its peers learn of it at the same boundary and raise
  it too, with that rank's message, so the launcher records it once and the job ends (it is deterministic: a retry
  would read the same shards).

Signal handlers can only be installed from a process's main thread. Ray Train runs the training function in a
thread of the worker actor, so the launcher installs the handler through its backend's `on_training_start`, which
runs on each worker's main thread. Python runs a handler when that thread next executes Python code (measured on a
2-node test cluster: the preemption checkpoint committed 0.4 s after the SIGTERM). `train()` called directly in a
single process leaves signals alone.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data import BadDataError
from pipeline.train.ranks import WorkerContext, gather_ranks

log = logging.getLogger(__name__)

_notice = threading.Event()  # per process: a SIGTERM arrived
_training = threading.Event()  # per process: a training loop is running (outside it SIGTERM does what it did before)


class StopReason(enum.IntEnum):
    """Why the ranks stop; the agreement takes the largest, so a deterministic stop outranks a preemption."""

    NONE = 0
    PREEMPTED = 1
    BAD_DATA = 2


class Preempted(RuntimeError):
    """The run was checkpointed at `step` after a preemption notice; raised so that Ray Train restarts the group."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # keeps `step` through pickling (Ray ships exceptions between processes)
        return type(self), (str(self), self.step)


def install_sigterm_handler() -> bool:
    """Make SIGTERM a preemption notice (this process's main thread only); whether it was installed.

    Outside a training loop (before it, or while Ray ends a finished worker group), and on a second SIGTERM, the
    signal goes to the handler there was before (Ray's ends the worker process), so an operator who means "now"
    still gets it."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if (_notice.is_set() or not _training.is_set()) and callable(previous):
            previous(signum, frame)
            return
        _notice.set()
        log.warning("SIGTERM received (preemption notice): every rank checkpoints at the next step and stops")

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def preemption_noticed() -> bool:
    return _notice.is_set()


def clear_preemption_notice() -> None:
    """Forget a notice (a new training attempt in the same process, as in tests)."""
    _notice.clear()


class StopAgreement:
    """The per-step agreement among ranks. `agree()` is collective: every rank calls it once per step."""

    def __init__(self, ctx: WorkerContext) -> None:
        """Notices count from now until `close()`."""
        self.ctx = ctx
        self._bad_data: BadDataError | None = None
        self._group = None
        if ctx.world_size > 1 and dist.get_backend() != "gloo":
            # Agree on the CPU over gloo: a device all-reduce would add a host-device sync to every step.
            self._group = dist.new_group(backend="gloo")
        _training.set()

    def close(self) -> None:
        _training.clear()

    def bad_data(self, error: BadDataError) -> None:
        """This rank's loader gave up; the ranks stop together at `agree()`."""
        self._bad_data = error

    def agree(self) -> StopReason:
        """Every rank's requests combined; raises `BadDataError` (on every rank, with the reporting rank's message)
        when one rank's data failed. A preemption is returned: the caller checkpoints, then raises `preempted()`."""
        local = StopReason.BAD_DATA if self._bad_data else (
            StopReason.PREEMPTED if preemption_noticed() else StopReason.NONE)
        reason = local
        if self.ctx.world_size > 1:
            flag = torch.tensor([int(local)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            reason = StopReason(int(flag.item()))
        if reason is StopReason.BAD_DATA:
            messages = gather_ranks(str(self._bad_data) if self._bad_data else None, self.ctx)
            rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
            raise BadDataError(message if rank == self.ctx.rank else f"(reported by rank {rank}) {message}")
        return reason

    def preempted(self, step: int, checkpoint_url: str | None) -> Preempted:
        """The error every rank raises once the preemption checkpoint is committed."""
        where = f"checkpoint {checkpoint_url}" if checkpoint_url else "its latest checkpoint"
        return Preempted(f"preempted after step {step}: the run resumes from {where}", step=step)
