"""Where this process sits in a DDP job, and the few collectives the training loop needs across ranks.

The same loop runs on one process (`WorkerContext()`: rank 0 of 1, no process group) and as a Ray Train worker,
where `pipeline.train.launcher` has already set up the process group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.storage import join_url, write_bytes


@dataclass(frozen=True)
class WorkerContext:
    """Where this process sits in the job; from Ray Train's context, or (0, 1, 0, 0) for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def gather_ranks(value: Any, ctx: WorkerContext) -> list:
    """Every rank's `value` (picklable), in rank order (collective: all ranks must call it)."""
    if ctx.world_size == 1:
        return [value]
    values: list = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(value: float, ctx: WorkerContext) -> float:
    """The mean of every rank's `value` (collective); on the rank's device, since NCCL reduces only GPU tensors."""
    if ctx.world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64 if ctx.device.type == "cpu" else torch.float32,
                         device=ctx.device)
    dist.all_reduce(total)
    return float(total.item()) / ctx.world_size


def barrier(ctx: WorkerContext) -> None:
    """Wait for every rank (collective; nothing to wait for on a single process)."""
    if ctx.world_size > 1:
        dist.barrier()


def write_rank_info(config: Config, ctx: WorkerContext, start_step: int) -> None:
    """Where each rank runs (node, host, pid) in `<run>/workers/rank-RRRRR.json`: for operators reading a run
    directory, and for the tests. Rank 0 also records each worker group's start in `<run>/worker_groups/
    <milliseconds>.json` (start step, world size, batch split): the history of an elastic run's sizes."""
    split = config.batch_split(ctx.world_size)
    info = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank, "node_rank": ctx.node_rank,
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(ctx.device), "start_step": start_step,
            "per_rank_batch": split.per_rank, "micro_batches": split.micro_batches, "time": time.time()}
    try:
        import ray

        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    name = f"rank-{ctx.rank:05d}.json"
    write_bytes(join_url(config.run_dir, "workers", name), json.dumps(info).encode(), config.storage)
    if ctx.rank == 0:
        name = f"{int(info['time'] * 1000):013d}.json"
        write_bytes(join_url(config.run_dir, "worker_groups", name), json.dumps(info).encode(), config.storage)
