"""What a shard write did: `ShardReport`, which `ShardWriter.write` returns, and the inputs it skipped."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.manifest import ShardInfo


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
        lines.append(f"bad inputs skipped: {len(self.bad)}")
        lines += [f"  {b.source}: {b.reason}" for b in self.bad[:50]]
        if len(self.bad) > 50:
            lines.append(f"  ... and {len(self.bad) - 50} more (listed in the shard sidecars shard-*.json)")
        return "\n".join(lines)
