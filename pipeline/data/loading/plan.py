"""The epoch plan: which samples every (rank, loader worker) slot reads, in which order, and how many batches.

Every rank computes the same plan from (manifest sample counts, seed, epoch, split parameters); nothing is
communicated between ranks (a rank hands its plan to its own loader workers). Terms:

- slot: one (rank, loader worker) pair, `slot = rank * workers + worker`; a slot reads its own shards only.
- part: the samples of one shard that a slot reads (all of them, or a subset when the rest of an interrupted
  epoch is re-split across a different number of slots).
- window: consecutive parts of a slot holding at least `shuffle_buffer` samples; the slot emits each window's
  samples in a random permutation seeded by (seed, epoch, segment, slot, window). Unlike a streaming shuffle
  buffer, the order is a function of the manifest counts alone, so which samples a slot has consumed after emitting
  `position` samples is computable without reading any data (resume, re-split).
- position: how many planned samples a slot has emitted (good or bad); the unit of resumable progress.
- segment: an epoch runs under one split (world size, workers, batch size, shuffle settings); restoring with a
  different split ends the segment and re-splits the samples not yet consumed into the next one.

Training plans are exact: shards are shuffled per epoch, assigned to ranks and then to workers by sample count
(largest first, to the least-loaded), and each slot gets a quota of full batches, trimmed so that every rank has
the same number of batches (the smallest rank total). The rest is dropped at the epoch end and reported.
Evaluation plans keep manifest order, emit every sample once, and pad ranks to the largest rank's batch count.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Remaining samples of an epoch: shard index -> ascending sample indices, or None for "all of the shard".
Remaining = dict[int, np.ndarray | None]


class ShardSplitError(ValueError):
    """The dataset has too few shards (or samples) for the requested ranks x loader workers."""


@dataclass(frozen=True)
class ShardPart:
    """The samples of one shard that one slot reads."""

    shard: int  # index into the manifest's shard list
    count: int
    indices: tuple[int, ...] | None = None  # ascending sample indices within the shard; None = 0..count-1

    def sample_indices(self) -> Sequence[int]:
        return range(self.count) if self.indices is None else self.indices


@dataclass(frozen=True)
class Split:
    """The parameters that shape a plan; a checkpoint stores them per segment."""

    world_size: int
    workers: int  # loader workers per rank, at least 1 (0 DataLoader workers = 1 in-process slot)
    batch_size: int  # per rank
    shuffle_buffer: int = 0
    shuffle_shards: bool = False

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "shuffle_shards": self.shuffle_shards}

    @classmethod
    def from_dict(cls, d: Mapping) -> Split:
        return cls(int(d["world_size"]), int(d["workers"]), int(d["batch_size"]), int(d["shuffle_buffer"]),
                   bool(d["shuffle_shards"]))


@dataclass(frozen=True)
class SlotPlan:
    slot: int
    parts: tuple[ShardPart, ...]
    windows: tuple[int, ...]  # index of the first part of each window
    batches: int  # train: full batches to emit; eval: batches including padding

    @property
    def samples(self) -> int:
        return sum(p.count for p in self.parts)

    def window_parts(self, w: int) -> range:
        end = self.windows[w + 1] if w + 1 < len(self.windows) else len(self.parts)
        return range(self.windows[w], end)

    @cached_property
    def window_sizes(self) -> tuple[int, ...]:
        return tuple(sum(self.parts[i].count for i in self.window_parts(w)) for w in range(len(self.windows)))


@dataclass(frozen=True)
class EpochPlan:
    """One segment of one epoch for the whole job (every rank's slots)."""

    seed: int
    epoch: int
    segment: int  # 0 for a fresh epoch; +1 each time an interrupted epoch is re-split
    split: Split
    train: bool
    slots: tuple[SlotPlan, ...]
    batches_per_rank: int
    samples: int  # planned samples in this segment
    dropped: int  # train: planned samples no batch will hold (epoch-end remainder); eval: 0

    def rank_slots(self, rank: int) -> list[SlotPlan]:
        k = self.split.workers
        return list(self.slots[rank * k:(rank + 1) * k])

    def window_order(self, slot: int, window: int) -> np.ndarray:
        """Emission order of a window: a permutation of its items (identity without shuffling)."""
        size = self.slots[slot].window_sizes[window]
        if not self.train or self.split.shuffle_buffer <= 0:
            return np.arange(size)
        rng = np.random.default_rng([self.seed % 2**63, self.epoch, self.segment, slot, window])
        return rng.permutation(size)

    def window_items(self, slot: int, window: int) -> list[tuple[int, int]]:
        """(part index within the slot, sample index within the shard) of each item of a window, in read order."""
        sp = self.slots[slot]
        return [(pi, k) for pi in sp.window_parts(window) for k in sp.parts[pi].sample_indices()]

    def planned_items(self, slot: int, start: int = 0) -> Iterator[tuple[int, int, int]]:
        """(position, part index, sample index) of the slot's items in emission order, from `start` on."""
        offset = 0
        for w, size in enumerate(self.slots[slot].window_sizes):
            if start < offset + size:
                items, order = self.window_items(slot, w), self.window_order(slot, w)
                for t in range(max(0, start - offset), size):
                    pi, k = items[order[t]]
                    yield offset + t, pi, k
            offset += size

    def wanted_from(self, slot: int, start: int) -> dict[int, set[int] | None]:
        """What the slot still reads when it resumes at position `start`: part index -> the sample indices it
        will emit (an empty set: the part is never opened); parts not named are read whole."""
        sp, wanted = self.slots[slot], {}
        offset = 0
        for w, size in enumerate(sp.window_sizes):
            if start >= offset + size:
                wanted.update({pi: set() for pi in sp.window_parts(w)})
            elif start > offset:
                items, order = self.window_items(slot, w), self.window_order(slot, w)
                for pi in sp.window_parts(w):
                    wanted[pi] = set()
                for t in range(start - offset, size):
                    pi, k = items[order[t]]
                    wanted[pi].add(k)  # type: ignore[union-attr]
            offset += size
        return wanted

    def consumed(self, slot: int, position: int) -> dict[int, np.ndarray | None]:
        """Samples the slot has emitted after `position` items: shard -> sample indices (None = its whole part)."""
        sp, out = self.slots[slot], {}
        offset = 0
        for w, size in enumerate(sp.window_sizes):
            if position <= offset:
                break
            if position >= offset + size:
                for pi in sp.window_parts(w):
                    _add(out, sp.parts[pi])
            else:
                items, order = self.window_items(slot, w), self.window_order(slot, w)
                taken: dict[int, list[int]] = {}
                for t in range(position - offset):
                    pi, k = items[order[t]]
                    taken.setdefault(sp.parts[pi].shard, []).append(k)
                for shard, ks in taken.items():
                    _merge(out, shard, np.asarray(sorted(ks), dtype=np.int64))
            offset += size
        return out


def _add(out: dict[int, np.ndarray | None], part: ShardPart) -> None:
    if part.indices is None:
        out[part.shard] = None
    else:
        _merge(out, part.shard, np.asarray(part.indices, dtype=np.int64))


def _merge(out: dict[int, np.ndarray | None], shard: int, ks: np.ndarray) -> None:
    if shard in out and out[shard] is None:
        return
    out[shard] = ks if shard not in out else np.union1d(out[shard], ks)


# ------------------------------------------------------------------------------------------------- the split


def check_shard_split(manifest: object, world_size: int, loader_workers: int, batch_size: int | None = None) -> None:
    """Refuse a training split that cannot give every (rank, loader worker) slot its own shard.

    `world_size` is the number of DDP ranks in the whole job (num_nodes x workers_per_node). Raises
    `ShardSplitError` naming the fallback (fewer loader workers) or the fix (more shards). With `batch_size` (per
    rank) it also refuses a split in which a rank would get no full batch per epoch.
    """
    counts = [s.samples for s in manifest.shards]  # type: ignore[attr-defined]
    shards = sum(1 for c in counts if c > 0)
    workers = max(1, loader_workers)
    slots = world_size * workers
    if world_size < 1:
        raise ShardSplitError(f"world_size={world_size}: must be >= 1")
    if shards < world_size:
        raise ShardSplitError(
            f"the dataset has {shards} non-empty shards but the job has {world_size} ranks: every rank needs at "
            f"least one shard (and one per loader worker: {slots} for data.loader_workers={loader_workers}); "
            f"reshard the data into >= {slots} shards or use fewer ranks")
    if shards < slots:
        fallback = shards // world_size
        raise ShardSplitError(
            f"the dataset has {shards} non-empty shards but {world_size} ranks x {workers} loader workers = {slots} "
            f"slots each need their own shard; set data.loader_workers={fallback} (<= shards / ranks), or reshard "
            f"the data into >= {slots} shards")
    if batch_size is not None:
        plan = train_plan(counts, Split(world_size, workers, batch_size), seed=0, epoch=0)
        if plan.batches_per_rank == 0:
            raise ShardSplitError(
                f"with {world_size} ranks x {workers} loader workers and {batch_size} samples per rank batch, some "
                f"rank gets no full batch from its {shards // world_size}-ish shards ({sum(counts)} samples in all); "
                "use fewer loader workers, a smaller batch, or more data")


def _balanced(loads: Sequence[int], bins: int) -> list[list[int]]:
    """Assign items (in the given order of preference for ties) to `bins`: largest first, to the least-loaded bin.

    Longest-processing-time-first; returns each bin's item indices in the original order.
    """
    order = sorted(range(len(loads)), key=lambda i: -loads[i])  # stable: ties keep the given order
    heap = [(0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + loads[i], b))
    return [sorted(items) for items in out]


def _windows(parts: Sequence[ShardPart], buffer: int) -> tuple[int, ...]:
    starts, size = [], 0
    for i, part in enumerate(parts):
        if i == 0 or size >= max(1, buffer):
            starts.append(i)
            size = 0
        size += part.count
    return tuple(starts)


def _split_for_slots(parts: list[ShardPart], slots: int) -> list[ShardPart]:
    """Halve the largest parts until every slot can have one (re-split of a remainder only)."""
    parts = list(parts)
    while len(parts) < slots:
        i = max(range(len(parts)), key=lambda j: parts[j].count, default=None)
        if i is None or parts[i].count < 2:
            break
        ks = list(parts[i].sample_indices())
        half = len(ks) // 2
        parts[i:i + 1] = [ShardPart(parts[i].shard, half, tuple(ks[:half])),
                          ShardPart(parts[i].shard, len(ks) - half, tuple(ks[half:]))]
    return parts


def _assign(parts: list[ShardPart], split: Split, seed: int, epoch: int, segment: int,
            shuffle: bool) -> list[list[ShardPart]]:
    """Parts of every slot, in read order: shuffled (seeded), then balanced over ranks, then over workers."""
    if shuffle:
        rng = np.random.default_rng([seed % 2**63, epoch, segment, 2**32])
        parts = [parts[i] for i in rng.permutation(len(parts))]
    slots: list[list[ShardPart]] = []
    for rank_items in _balanced([p.count for p in parts], split.world_size):
        rank_parts = [parts[i] for i in rank_items]
        for worker_items in _balanced([p.count for p in rank_parts], split.workers):
            slots.append([rank_parts[i] for i in worker_items])
    return slots


def full_epoch(counts: Sequence[int]) -> Remaining:
    return {j: None for j, c in enumerate(counts) if c > 0}


def subtract(remaining: Remaining, counts: Sequence[int], consumed: Mapping[int, np.ndarray | None]) -> Remaining:
    """`remaining` minus `consumed` (None = every remaining sample of the shard)."""
    out: Remaining = {}
    for shard, left in remaining.items():
        if shard not in consumed:
            out[shard] = left
            continue
        taken = consumed[shard]
        if taken is None:
            continue
        base = np.arange(counts[shard]) if left is None else left
        rest = np.setdiff1d(base, taken, assume_unique=True)
        if rest.size:
            out[shard] = rest
    return out


def train_plan(counts: Sequence[int], split: Split, seed: int, epoch: int, segment: int = 0,
               remaining: Remaining | None = None) -> EpochPlan:
    """The training plan of one epoch (segment 0), or of the rest of an interrupted one (`remaining`)."""
    if remaining is None:
        parts = [ShardPart(j, c) for j, c in enumerate(counts) if c > 0]
    else:
        parts = [ShardPart(j, counts[j] if ks is None else len(ks), None if ks is None else tuple(int(k) for k in ks))
                 for j, ks in sorted(remaining.items())]
        parts = _split_for_slots([p for p in parts if p.count > 0], split.slots)
    assigned = _assign(parts, split, seed, epoch, segment, split.shuffle_shards)
    batch = split.batch_size
    quotas = [sum(p.count for p in slot) // batch for slot in assigned]
    k = split.workers
    target = min(sum(quotas[r * k:(r + 1) * k]) for r in range(split.world_size))
    for r in range(split.world_size):  # trim every rank to the smallest rank total, largest quota first
        for _ in range(sum(quotas[r * k:(r + 1) * k]) - target):
            s = max(range(r * k, (r + 1) * k), key=lambda i: (quotas[i], -i))
            quotas[s] -= 1
    slots = tuple(SlotPlan(s, tuple(ps), _windows(ps, split.shuffle_buffer), quotas[s])
                  for s, ps in enumerate(assigned))
    samples = sum(p.count for p in parts)
    return EpochPlan(seed, epoch, segment, split, True, slots, target, samples,
                     samples - target * batch * split.world_size)


def eval_plan(counts: Sequence[int], split: Split) -> EpochPlan:
    """Every sample exactly once, manifest order within a slot; ranks padded to the same number of batches."""
    parts = [ShardPart(j, c) for j, c in enumerate(counts) if c > 0]
    assigned = _assign(parts, split, 0, 0, 0, shuffle=False)
    quotas = [math.ceil(sum(p.count for p in slot) / split.batch_size) for slot in assigned]
    k = split.workers
    target = max(sum(quotas[r * k:(r + 1) * k]) for r in range(split.world_size))
    for r in range(split.world_size):  # pad short ranks: whole padding batches on their least busy workers
        for _ in range(target - sum(quotas[r * k:(r + 1) * k])):
            s = min(range(r * k, (r + 1) * k), key=lambda i: (quotas[i], i))
            quotas[s] += 1
    slots = tuple(SlotPlan(s, tuple(ps), tuple(range(len(ps))), quotas[s]) for s, ps in enumerate(assigned))
    return EpochPlan(0, 0, 0, split, False, slots, target, sum(p.count for p in parts), 0)


def resumed_plan(counts: Sequence[int], history: Sequence[tuple[Split, Mapping[int, int]]], split: Split,
                 seed: int, epoch: int) -> EpochPlan:
    """The plan of the current segment of `epoch`, after the segments in `history` consumed what they did.

    `history` holds (split, {slot: position}) of every earlier segment of this epoch, oldest first; positions are
    job-wide (every old rank's slots). With no history this is the fresh epoch plan.
    """
    if not history:
        return train_plan(counts, split, seed, epoch)
    remaining = full_epoch(counts)
    for index, (old, positions) in enumerate(history):
        plan = train_plan(counts, old, seed, epoch, index, None if index == 0 else remaining)
        consumed: dict[int, np.ndarray | None] = {}
        for slot, position in positions.items():
            for shard, ks in plan.consumed(slot, position).items():
                if ks is None:
                    consumed[shard] = None
                else:
                    _merge(consumed, shard, ks)
        remaining = subtract(remaining, counts, consumed)
    return train_plan(counts, split, seed, epoch, len(history), remaining)
