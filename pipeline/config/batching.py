"""How the global batch is split at a world size: each rank's batch and its gradient-accumulation micro-batches.

`train.global_batch_size` is the same at every world size, so the learning-rate schedule (a function of global
samples seen) and each step's gradient do not depend on how many ranks compute it: each of W ranks loads
global / W images per step and runs them as `micro_batches` forward/backward passes whose gradients accumulate.
The number of passes is `train.micro_batches` as given, or, with `train.max_micro_batch_size`, the fewest that
keep each pass within that many images (a memory bound): fewer ranks then accumulate more passes of the same size.

Elastic training (`cluster.num_workers=[min, max]`) lets Ray pick any world size in the range, so every one of
them must split: `unusable_world_sizes` names those that cannot and why, and `range_problem` says it in one message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class BatchSplitError(ValueError):
    """The global batch cannot be split at a world size; the message says which settings and why."""


@dataclass(frozen=True)
class BatchSplit:
    """The split of one step's global batch at `world_size` ranks."""

    world_size: int
    per_rank: int  # images each rank loads per step (the loader's batch)
    micro_batches: int  # forward/backward passes per rank per step (of per_rank // micro_batches images each)


def micro_batch_count(per_rank: int, micro_batches: int = 1, max_micro_batch_size: int | None = None) -> int:
    """Forward passes for a rank batch of `per_rank` images: `micro_batches`, or with `max_micro_batch_size` the
    fewest equal passes of at most that many images. Raises `BatchSplitError` when they cannot be equal."""
    if max_micro_batch_size is None:
        if per_rank % micro_batches:
            raise BatchSplitError(f"train.micro_batches={micro_batches} must divide the per-worker batch {per_rank} "
                                  "(train.global_batch_size / cluster.num_workers)")
        return micro_batches
    # per_rank itself divides per_rank, so the search always ends (at passes of one image).
    return next(m for m in range(math.ceil(per_rank / max_micro_batch_size), per_rank + 1) if per_rank % m == 0)


def split_batch(global_batch_size: int, world_size: int, micro_batches: int = 1,
                max_micro_batch_size: int | None = None) -> BatchSplit:
    """The split at `world_size`, or `BatchSplitError` saying why there is none."""
    if global_batch_size % world_size:
        raise BatchSplitError(
            f"train.global_batch_size={global_batch_size} must be divisible by cluster.num_workers={world_size} "
            "(the global batch is split evenly across DDP ranks)")
    per_rank = global_batch_size // world_size
    return BatchSplit(world_size, per_rank, micro_batch_count(per_rank, micro_batches, max_micro_batch_size))


def unusable_world_sizes(global_batch_size: int, world_sizes: range, micro_batches: int = 1,
                         max_micro_batch_size: int | None = None) -> dict[int, str]:
    """{world size: why the global batch cannot be split there} for the sizes in `world_sizes` that fail."""
    problems = {}
    for size in world_sizes:
        try:
            split_batch(global_batch_size, size, micro_batches, max_micro_batch_size)
        except BatchSplitError as error:
            problems[size] = str(error)
    return problems


def batch_for_every_size(global_batch_size: int, world_sizes: range, micro_batches: int = 1) -> int:
    """The smallest global batch >= `global_batch_size` that splits at every size in `world_sizes`."""
    step = math.lcm(*world_sizes) * micro_batches
    return step * math.ceil(global_batch_size / step)


def check_batch_splits(global_batch_size: int, world_sizes: range, micro_batches: int = 1,
                       max_micro_batch_size: int | None = None) -> None:
    """Refuse settings with which some world size in `world_sizes` cannot split the global batch: one size gets
    its own message, a range one naming every size that fails and a global batch that splits at all of them."""
    if max_micro_batch_size is not None and micro_batches != 1:
        raise BatchSplitError(f"train.micro_batches={micro_batches} and train.max_micro_batch_size="
                              f"{max_micro_batch_size} both set the micro-batches: set one")
    if len(world_sizes) == 1:
        split_batch(global_batch_size, world_sizes[0], micro_batches, max_micro_batch_size)
        return
    problems = unusable_world_sizes(global_batch_size, world_sizes, micro_batches, max_micro_batch_size)
    if problems:
        fix = batch_for_every_size(global_batch_size, world_sizes, micro_batches)
        raise BatchSplitError(range_problem(world_sizes, problems, f"train.global_batch_size={fix} splits at every "
                                            "size"))


def range_problem(world_sizes: range, problems: dict[int, str], fix: str = "") -> str:
    """One message for an elastic range some of whose sizes cannot work: the range, the sizes, why, and a fix."""
    sizes = ", ".join(str(size) for size in problems)
    reasons = "; ".join(f"at {size}: {why}" for size, why in problems.items())
    return (f"cluster.num_workers=[{world_sizes[0]}, {world_sizes[-1]}] lets Ray run any number of workers in that "
            f"range, and {len(problems)} of them cannot work ({sizes}): {reasons}" + (f". {fix}" if fix else ""))
