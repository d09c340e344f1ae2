"""Ray Train's torch backend with the preemption handler: SIGTERM on a worker becomes a checkpoint-and-stop.

Ray Train runs the training function in a thread of each worker actor, and Python accepts signal handlers only
from a process's main thread. The backend's `on_training_start` runs on each worker's main thread (through the
worker group's `execute`), after the process group is up and before the training function starts, so the handler
goes in there. Imported only where Ray is (the launcher, the workers).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from pipeline.config import Config
from pipeline.train.stopping import install_sigterm_handler

log = logging.getLogger(__name__)


def install_preemption_handler() -> None:
    """Run on each worker's main thread."""
    if not install_sigterm_handler():
        log.warning("SIGTERM is not a preemption notice on this worker: not called on its main thread")


class PreemptibleTorchBackend(_TorchBackend):
    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_preemption_handler)


class PreemptibleTorchConfig(TorchConfig):
    @property
    def backend_cls(self) -> type:
        return PreemptibleTorchBackend


def preemptible_torch_config(config: Config) -> PreemptibleTorchConfig:
    """gloo on CPUs, NCCL on GPUs; `cluster.collective_timeout_s` bounds every collective of the process group."""
    return PreemptibleTorchConfig(backend="nccl" if config.cluster.use_gpu else "gloo",
                                  timeout_s=int(config.cluster.collective_timeout_s))
