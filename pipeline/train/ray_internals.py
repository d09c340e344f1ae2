"""The one module that leans on Ray Train behaviour no public API covers; everything else uses Ray's public API.

Each use below is checked by `tests/test_ray_internals.py`, which names the symbol when a Ray version no longer has
it (the tested range is pinned in pyproject.toml):

1. **The torch backend's `on_training_start` hook** (`TorchConfig.backend_cls`, a `ray.train.backend.Backend`): it
   runs on each worker's main thread after the process group is up, the only place a signal handler can be
   installed (Python takes them only there; Ray Train runs the training function in another thread). The backend
   class is reached through `TorchConfig`'s public property, not imported by its private name.
2. **Environment variables Ray Train's controller reads**, forwarded from the driver: the worker health-check
   timeout (`cluster.stall_timeout_s`) and how often its preemption watcher polls Ray Core's node drains
   (`cluster.preemption_poll_s`). Ray exposes neither in `RunConfig`/`FailureConfig`. A third, how long the torch
   backend waits for the workers to close their process group when a group stops (`GROUP_SHUTDOWN_TIMEOUT_S`), is
   not forwarded by Ray: the same backend hook as point 1 sets it in the controller's process.
3. **A stop that Ray's failure policy charges to `FailureConfig.max_preemption_failures`.** Ray counts a worker
   death as a preemption when its `RayActorError.preempted` flag is set (both public). A rank that has
   checkpointed on a preemption notice raises `Preempted`, such an error, so its restart does not spend
   `cluster.max_failures` (reserved for real crashes); that a *raised* one counts is the policy's behaviour.
4. **Ray Train's logging**: the worker logs every training-function error with its traceback, and its training
   context logs every `ray.train.report()` with all metrics at INFO. An expected stop (a preemption, or a rank
   whose peer is gone) is one line (the worker's own), and the loop's progress line already says what a report
   would.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.exceptions import RayActorError
from ray.train.torch import TorchConfig

log = logging.getLogger(__name__)

# Read by Ray Train's controller, which Ray forwards them to from the driver's environment.
HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"  # Ray's default: 600 s
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"  # Ray's default: 5 s
GROUP_SHUTDOWN_TIMEOUT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # Ray's default: 30 s
# A live worker closes its process group in milliseconds (gloo, measured on the tests' cluster); a frozen one never
# does, and Ray ends the workers after this wait either way. Ray's 30 s were 30 s more of every stall's recovery,
# after cluster.stall_timeout_s had already declared the worker dead.
GROUP_SHUTDOWN_TIMEOUT_S = 5

# The loggers of point 4, by module name (Ray names them after their modules).
WORKER_ERROR_LOGGER = "ray.train.v2._internal.util"  # "Error in training function:\n<traceback>"
REPORT_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"


class Preempted(RayActorError):
    """The ranks checkpointed `step` on a preemption notice and stop; Ray Train restarts the group from there.

    A `RayActorError` with `preempted` set, so Ray charges the restart to `max_preemption_failures` (point 3)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(error_msg=message, preempted=True)
        self.step = step

    def __reduce__(self):  # keeps message and step through pickling (Ray ships errors between processes)
        return type(self), (self.error_msg, self.step)


class PeerLost(RuntimeError):
    """A collective failed because another rank's process is gone (killed, or its node lost): Ray Train restarts
    the group for the rank that died, and counts it as one of `max_failures`; this rank's part is one line."""


# What gloo and NCCL say when the other end of a collective has gone away.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted",
              "ncclRemoteError")


def peer_lost(error: BaseException) -> PeerLost | None:
    """`error` as a `PeerLost` when it is a collective that lost its peer, else None."""
    text = str(error)
    if isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_GONE):
        return PeerLost(f"a collective lost its peer ({text.splitlines()[0][-160:]}): Ray Train restarts the "
                        "group from the latest checkpoint")
    return None


EXPECTED_STOPS = (Preempted, PeerLost)


def controller_environment(stall_timeout_s: float, preemption_poll_s: float) -> dict[str, str]:
    """The settings of point 2, as the driver's environment variables (set before `TorchTrainer.fit`)."""
    return {HEALTH_CHECK_TIMEOUT_ENV: str(stall_timeout_s), PREEMPTION_POLL_ENV: str(preemption_poll_s)}


class _ExpectedStops(logging.Filter):
    """Drops Ray's traceback log of an error that is an expected stop; the loop has said it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Error in training function")
                    and any(f"{stop.__module__}.{stop.__qualname__}:" in message for stop in EXPECTED_STOPS))


def quiet_ray_train_logs() -> None:
    """Point 4, on a worker: no traceback for a preemption stop, no INFO line per report."""
    logging.getLogger(WORKER_ERROR_LOGGER).addFilter(_ExpectedStops())
    try:
        from importlib import import_module

        context = import_module(REPORT_CONTEXT_MODULE)
    except ImportError:  # another Ray version: its logging is left as it is (tests/test_ray_internals.py says so)
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def install_preemption_handler() -> None:
    """Run on each worker's main thread (point 1)."""
    from pipeline.train.faults import PreemptionNotice

    if not PreemptionNotice.install():
        log.warning("SIGTERM is not a preemption notice on this worker: not called on its main thread")


class PreemptibleTorchBackend(TorchConfig().backend_cls):  # Ray's torch backend, by its public property
    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_preemption_handler)

    def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
        """Runs in the controller, which reads the wait from its own environment (an operator's setting wins)."""
        os.environ.setdefault(GROUP_SHUTDOWN_TIMEOUT_ENV, str(GROUP_SHUTDOWN_TIMEOUT_S))
        super().on_shutdown(worker_group, backend_config)


class PreemptibleTorchConfig(TorchConfig):
    @property
    def backend_cls(self) -> type:
        return PreemptibleTorchBackend


def preemptible_torch_config(use_gpu: bool, collective_timeout_s: int) -> PreemptibleTorchConfig:
    """gloo on CPUs, NCCL on GPUs; `collective_timeout_s` bounds every collective of the process group."""
    return PreemptibleTorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(collective_timeout_s))


def set_controller_environment(stall_timeout_s: float, preemption_poll_s: float) -> None:
    os.environ.update(controller_environment(stall_timeout_s, preemption_poll_s))
