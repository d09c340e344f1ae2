"""Connecting a driver to the Ray cluster, shared by training and evaluation (imports only `pipeline.config`).

Whichever of them connects first decides the job's runtime environment (`ray.init` takes effect once), so both go
through `connect_ray`: the environment settings every node needs are forwarded however the job starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator

from pipeline.config import Config

# Non-secret settings forwarded to workers on other nodes; credentials come from each node's own chain
# (instance role / workload identity / profile; for tracking, the node's WANDB_API_KEY or MLflow credentials),
# never from the driver's environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_BASE_URL")


# Worker log lines the job's console must show when they are written. Ray's driver deduplicates the lines it prints
# from workers: a line that another worker printed in the last 5 s (compared without its words that hold digits,
# so two ranks' "storage unreachable (read .../shard-000007.tar ...)" lines match) is held back and printed only
# when a later line arrives after that window. During an outage nothing else is logged, so a second rank's waiting
# line reached the console only when the store came back (108 s late) and its recovery line possibly never.
FAULT_LINES = ("storage unreachable", "storage back after", "; trying again in ")
DEDUP_ALLOW_ENV = "RAY_DEDUP_LOGS_ALLOW_REGEX"  # Ray's documented setting: lines matching it are never deduplicated


def keep_fault_lines_whole() -> None:
    """Exempt `FAULT_LINES` from Ray's log deduplication in this driver (an operator's own pattern is kept). Ray
    reads the setting when it is imported, so jobs call this first (`pipeline.cli.job_main`)."""
    ours = "|".join(re.escape(line) for line in FAULT_LINES)
    current = os.environ.get(DEDUP_ALLOW_ENV)
    if current is None or ours in current:
        os.environ[DEDUP_ALLOW_ENV] = current or ours
    else:
        os.environ[DEDUP_ALLOW_ENV] = f"{current}|{ours}"


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
