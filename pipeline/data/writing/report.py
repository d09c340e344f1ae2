"""What a shard write did: `ShardReport`, which `ShardWriter.write` returns, and the inputs it skipped."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.format import ShardInfo
from pipeline.data.loading import ShardSplitError, check_shard_split

LOADER_WORKER_CHOICES = (1, 2, 4, 8)  # the data.loader_workers values the summary names cluster sizes for


@dataclass(frozen=True)
class _Shards:
    shards: list[ShardInfo]  # what `check_shard_split` reads of a manifest


def largest_world_sizes(shards: list[ShardInfo]) -> dict[int, int]:
    """{data.loader_workers: the most training ranks (cluster.num_workers) `check_shard_split` accepts for these
    shards} for each of `LOADER_WORKER_CHOICES` that allows at least one rank."""
    manifest = _Shards(shards)

    def fits(ranks: int, loader_workers: int) -> bool:
        try:
            check_shard_split(manifest, ranks, loader_workers)
        except ShardSplitError:
            return False
        return True

    largest: dict[int, int] = {}
    for loader_workers in LOADER_WORKER_CHOICES:
        low, high = 0, len(shards)  # fits(low) holds (or low == 0); the answer is at most one rank per shard
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle, loader_workers) else (low, middle - 1)
        if low:
            largest[loader_workers] = low
    return largest


def cluster_sizes_line(shards: list[ShardInfo]) -> str:
    """One line naming the cluster.num_workers x data.loader_workers a training run on these shards can use."""
    largest = largest_world_sizes(shards)
    sizes = ", ".join(f"{ranks} x {workers}" for workers, ranks in largest.items())
    line = (f"trains on at most cluster.num_workers x data.loader_workers = {sizes} (each rank's loader worker "
            "needs its own shard)")
    if len(shards) < 32:
        line += ("; for more, write more, smaller shards (a lower shards.min_shard_mb, or shards.max_shard_mb; "
                 "shards.overwrite=true to replace these)")
    return line


@dataclass(frozen=True)
class RejectedInput:
    """An input the writer skipped (not a usable image, or a missing file), as its shard's sidecar records it."""

    key: str
    source: str  # the input path/URL, or the key for in-memory images
    reason: str
    shard: str = ""


@dataclass
class ShardReport:
    """What a `ShardWriter.write` did. `samples` and `bad` cover the whole dataset; the rest this run."""

    out: str
    shards: list[ShardInfo]
    samples: int
    bad: list[RejectedInput]
    reencoded: dict[str, int]  # reason -> count, whole dataset
    written_shards: list[int]  # indices written by this run
    skipped_shards: list[int]  # indices already published (resumed)
    processed_items: int  # input items read by this run
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.processed_items / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        total_bytes = sum(s.bytes for s in self.shards)
        lines = [
            f"{self.out}: {len(self.shards)} shards, {self.samples} samples, {total_bytes / 2**20:.1f} MiB",
            f"this run: {len(self.written_shards)} shards written, {len(self.skipped_shards)} already published, "
            f"{self.processed_items} inputs in {self.seconds:.1f} s ({self.samples_per_second:.1f} samples/s)",
        ]
        if self.reencoded:
            lines.append("re-encoded: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.reencoded.items())))
        lines.append(cluster_sizes_line(self.shards))
        lines.append(f"bad inputs skipped: {len(self.bad)}")
        lines += [f"  {b.source}: {b.reason}" for b in self.bad[:50]]
        if len(self.bad) > 50:
            lines.append(f"  ... and {len(self.bad) - 50} more (listed in the shard sidecars shard-*.json)")
        return "\n".join(lines)
