"""Connecting a driver to the Ray cluster, shared by training and evaluation (imports only `pipeline.config`).

Whichever of them connects first decides the job's runtime environment (`ray.init` takes effect once), so both go
through `connect_ray`: the environment settings every node needs are forwarded however the job starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from pipeline.config import Config

# Non-secret settings forwarded to workers on other nodes; credentials come from each node's own chain
# (instance role / workload identity / profile; for tracking, the node's WANDB_API_KEY or MLflow credentials),
# never from the driver's environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_BASE_URL")


def connect_ray(config: Config) -> None:
    """Connect to `cluster.address` unless already connected. Without one, Ray's own rule applies: RAY_ADDRESS,
    else the cluster `ray start` runs on this machine, else a new local cluster for this process."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    with keeping_the_sigterm_handler():
        ray.init(address=config.cluster.address, runtime_env={"env_vars": env} if env else None)


@contextlib.contextmanager
def keeping_the_sigterm_handler() -> Iterator[None]:
    """`ray.init` replaces the process's SIGTERM handler with Ray's (which exits at once, after a C++ stack dump);
    a job's own (`pipeline.cli`: unwind in order, exit code 143) goes back in place after it."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)
