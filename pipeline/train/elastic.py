"""Elastic worker counts for Ray Train: the checks for every world size Ray may choose, and its scaling arguments.

With `cluster.num_workers=[min, max]` Ray Train V2 starts the worker group as soon as `min` workers fit, restarts
it with fewer when a node is lost and with more when its resize monitor (every `cluster.resize_check_s`) finds room;
each new group resumes from the latest complete checkpoint. Any size in the range can occur, so each must split
the global batch (`pipeline.config.batching`) and the shards (`pipeline.data.check_shard_split`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.config.batching import BatchSplitError, range_problem
from pipeline.data.format import Manifest
from pipeline.data.loading import ShardSplitError, check_shard_split


def check_world_sizes(config: Config, manifest: Manifest) -> None:
    """Refuse a run some of whose world sizes cannot split the batch or the shards (before anything starts).

    One size raises that size's own error; a range raises one `ShardSplitError` naming every size that fails and
    why (the config validator already refused batch splits that fail, so here it is mostly the shards)."""
    sizes = config.cluster.world_sizes
    problems: dict[int, str] = {}
    for size in sizes:
        try:
            split = config.batch_split(size)
            check_shard_split(manifest, size, config.data.loader_workers, split.per_rank)
        except (ShardSplitError, BatchSplitError) as error:
            if len(sizes) == 1:
                raise
            problems[size] = str(error)
    if problems:
        working = [str(size) for size in sizes if size not in problems]
        fix = f"Only {', '.join(working)} can work" if working else "No size in the range can work"
        raise ShardSplitError(range_problem(sizes, problems, fix))


def scaling_arguments(config: Config) -> dict[str, Any]:
    """`num_workers` (an int, or Ray's (min, max) tuple) and the resize interval for Ray Train's `ScalingConfig`."""
    sizes = config.cluster.world_sizes
    if len(sizes) == 1:
        return {"num_workers": sizes[0]}
    return {"num_workers": (sizes[0], sizes[-1]), "elastic_resize_monitor_interval_s": config.cluster.resize_check_s}


def describe_workers(config: Config) -> str:
    """'2 worker(s)' or '1 to 4 workers (elastic)', for the launch log line."""
    sizes = config.cluster.world_sizes
    return f"{sizes[0]} worker(s)" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]} workers (elastic)"
