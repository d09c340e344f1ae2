"""The DataLoader-worker side of the loader: each worker is one slot that turns its planned samples into batches.

- Slots. Each (rank, DataLoader worker) pair is a slot that reads its own shards, as the epoch plan
  (`pipeline.data.loading.plan`) assigns them, in the plan's order. Batches are built inside the workers (per-rank batch
  size; DataLoader(batch_size=None)). The split is our own rather than webdataset's `split_by_node`/
  `split_by_worker`, which deal shards round-robin and cannot give exact, equal per-rank batch counts or a
  computable position. The main process computes the plan of the segment the workers start in and hands it to
  them (`WorkerStart`); a worker derives each later epoch's plan from the one before.
- Alignment. Every worker of a rank emits the same number of items per epoch (real batches, then tiny fillers the
  main process drops), so the DataLoader's strict round-robin never mixes two epochs; after a restore, workers
  before the next worker in the old round-robin emit one filler first, so the order continues exactly.
- Bad data. Undecodable images ("bad_image"), missing or malformed labels ("bad_label"), and samples a shard did
  not deliver ("truncated_shard" when it died midway or ended early, "corrupt_shard" when no sample could be read)
  are skipped, counted, and logged with shard URL and key (first 10, then every 100th per worker); a shard that
  ends early is logged once, naming where (the last sample and key it delivered, the byte offset) and why. The
  counts travel in the items to the main process, which decides whether there are too many
  (`pipeline.data.loading.stream`).
- Short slots (training). Quotas are fixed up front, so batch counts never change: a slot first spends the
  samples it would otherwise drop at the epoch end; if bad samples still leave it short, it replays its own
  stream from the start and fills its last batches with its earliest good samples, counted as "refilled" (a
  documented repeat). A slot with no good sample at all pads with `valid=False` entries ("padded").
  Evaluation batches are padded after a slot's last sample instead; bad samples become padding too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import AugmentConfig, StorageConfig
from pipeline.data.format import LabelError, LabelReader, image_member
from pipeline.data.loading.batch import Batch, BatchBuilder, SharedBuffers
from pipeline.data.loading.cache import ShardCache
from pipeline.data.loading.decode import BadSampleError, Decoder, decode_image
from pipeline.data.loading.plan import EpochPlan, train_plan
from pipeline.data.loading.shard_reader import PartEnd, ShardOpener, planned_samples, shard_opener

log = logging.getLogger(__name__)

_LOG_FIRST, _LOG_EVERY = 10, 100


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank's workers read and how they decode it, for the whole run (picklable)."""

    urls: list[str]
    counts: list[int]
    rank: int
    train: bool
    image_size: int
    augment: AugmentConfig
    decoder: Decoder
    fast_train_decode: bool
    labels: LabelReader  # where a sample keeps its labels and image (the manifest's sample format)
    storage: StorageConfig | None
    cache_dir: str | None
    cache_max_bytes: int


@dataclass(frozen=True)
class WorkerStart:
    """Where a rank's workers begin: the plan of the current epoch segment and the progress of the rank's slots."""

    plan: EpochPlan
    progress: Mapping[int, tuple[int, int]]  # own slot -> (position, batches delivered)


@dataclass
class Filler:
    """An item that keeps the DataLoader's round-robin aligned; carries counters, never reaches the loop."""

    epoch: int
    segment: int
    slot: int
    stats: dict[str, Any]


class SlotCounters:
    """A slot's counters since its last emitted item (its cache's too), plus rate-limited logging of bad samples."""

    def __init__(self, cache: ShardCache | None = None) -> None:
        self.cache = cache
        self.logged = 0
        self._reset()

    def _reset(self) -> None:
        self.good = self.refilled = self.padded = 0
        self.bad: dict[str, int] = {}
        self.bad_shards: dict[str, int] = {}
        self.shards: set[str] = set()  # shards whose samples were counted (good or bad)
        self.last_bad: str | None = None

    def skip(self, reason: str, url: str, which: str, detail: str, *, logged: bool = True) -> None:
        """Count a bad sample (`which`: "key K", or "sample N" of a shard that did not deliver it); log it unless
        `logged` is False (the shard reader has logged the shard's end once)."""
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.bad_shards[url] = self.bad_shards.get(url, 0) + 1
        self.last_bad = f"{url} {which} ({reason}: {detail})"
        if not logged:
            return
        self.logged += 1
        if self.logged <= _LOG_FIRST or self.logged % _LOG_EVERY == 0:
            log.warning("skipping sample %s %s: %s: %s (%d skipped by this worker)", url, which, reason, detail,
                        self.logged)

    def drain_counts(self) -> dict[str, Any]:
        """The counters since the previous call (an item's `stats`), reset to zero."""
        stats = {"good": self.good, "bad": self.bad, "bad_shards": self.bad_shards, "last_bad": self.last_bad,
                 "shards": sorted(self.shards), "refilled": self.refilled, "padded": self.padded}
        if self.cache is not None:
            stats["cache_hits"], stats["cache_misses"] = self.cache.drain_counts()
        self._reset()
        return stats


class SlotProducer:
    """Produces one slot's items for one epoch segment: its quota of batches, then fillers up to `items`."""

    def __init__(self, spec: WorkerSpec, open_shard: ShardOpener, counters: SlotCounters,
                 buffers: SharedBuffers | None = None) -> None:
        self.spec, self.open_shard, self.counters, self.buffers = spec, open_shard, counters, buffers
        self._replay: Iterator | None = None  # a short slot's second pass over its own stream
        self._barren = False  # the slot has no good sample at all

    def _samples(self, plan: EpochPlan, slot: int, start: int, count_bad: bool,
                 destination: Callable[[], torch.Tensor], tag: str = "") -> Iterator[tuple[int, list[int], str, int]]:
        """(position, labels, key, sample id) of the slot's good samples in plan order from `start`, each image
        decoded into `destination()` (the batch's next image) before it is yielded.

        The sample id is the sample's index in the whole dataset (manifest shard order), the same on every rank.
        """
        spec, sp = self.spec, plan.slots[slot]
        first_id = [0, *itertools.accumulate(spec.counts)]
        raw = planned_samples(plan, slot, start, spec.urls, spec.counts, self.open_shard, log_ends=count_bad)
        with contextlib.closing(raw):
            for position, pi, k, sample in raw:
                url = spec.urls[sp.parts[pi].shard]
                if count_bad:
                    self.counters.shards.add(url)
                if isinstance(sample, PartEnd):
                    if count_bad:
                        reason = "corrupt_shard" if sample.samples == 0 else "truncated_shard"
                        self.counters.skip(reason, url, f"sample {k}", sample.error or "missing", logged=False)
                    continue
                key = str(sample.get("__key__", f"#{k}"))
                try:
                    labels = _labels(spec.labels, sample)
                    data = image_member(sample, spec.labels.fmt)
                    if data is None:
                        raise BadSampleError("bad_image", f"no image member (.{'/.'.join(spec.labels.fmt.image)})")
                    rng = random.Random(f"{plan.seed}:{plan.epoch}:{plan.segment}:{slot}:{position}{tag}")
                    decode_image(data, spec.image_size, spec.augment, train=spec.train, rng=rng, decoder=spec.decoder,
                                 fast_train_decode=spec.fast_train_decode, out=destination())
                except BadSampleError as exc:
                    if count_bad:
                        self.counters.skip(exc.reason, url, f"key {key}", exc.detail)
                    continue
                if count_bad:
                    self.counters.good += 1
                yield position, labels, key, first_id[sp.parts[pi].shard] + k

    def items(self, plan: EpochPlan, slot: int, start: int, done: int, items: int,
              lead: bool = False) -> Iterator[Batch | Filler]:
        """Batches `done`..quota-1 of the slot from planned position `start`, then fillers up to `items` in all
        (`lead`: one filler first)."""
        quota, samples = plan.slots[slot].batches, plan.slots[slot].samples
        builder = BatchBuilder(plan.split.batch_size, self.spec.image_size, self.buffers)
        emitted = 0
        if lead:
            items -= 1
            yield Filler(plan.epoch, plan.segment, slot, self.counters.drain_counts())

        def batch(valid: int, position: int) -> Batch:
            return builder.finish(valid, epoch=plan.epoch, segment=plan.segment, slot=slot, index=done + emitted,
                                  position=position, stats=self.counters.drain_counts())

        if done < quota:
            stream = self._samples(plan, slot, start, count_bad=True, destination=builder.next_image)
            for position, labels, key, sample_id in stream:
                builder.add(labels, key, sample_id)
                if len(builder) == builder.size:
                    yield batch(builder.size, position + 1)
                    emitted += 1
                    if done + emitted == quota:
                        break
            stream.close()
        while done + emitted < quota:
            if self.spec.train:  # a short slot: repeat its earliest good samples rather than change the batch count
                self._refill(plan, slot, builder)
            yield batch(len(builder), samples)  # evaluation: padding after the last sample
            emitted += 1
        self._end_replay()
        for _ in range(items - emitted):
            yield Filler(plan.epoch, plan.segment, slot, self.counters.drain_counts())

    def _end_replay(self) -> None:
        """The segment's quota is met: a short slot's replay (`_refill`) starts afresh in the next one."""
        if self._replay is not None:
            self._replay.close()  # type: ignore[attr-defined]
        self._replay, self._barren = None, False

    def _refill(self, plan: EpochPlan, slot: int, builder: BatchBuilder) -> None:
        """Fill the builder with the slot's earliest good samples, again and again; padding if it has none."""
        if self._replay is None:
            log.warning("epoch %d slot %d ran short of good samples (bad data): repeating its earliest samples",
                        plan.epoch, slot)
        while len(builder) < builder.size:
            got = next(self._replay, None) if self._replay is not None else None
            if got is None and not self._barren:
                self._replay = self._samples(plan, slot, 0, count_bad=False, destination=builder.next_image,
                                             tag=":refill")
                got = next(self._replay, None)
                self._barren = got is None  # not one good sample in the whole slot: pad from now on
            if got is None:
                self.counters.padded += builder.size - len(builder)
                break
            builder.add(*got[1:])
            self.counters.refilled += 1


def _labels(reader: LabelReader, sample: dict) -> list[int]:
    try:
        return reader.labels(sample)
    except LabelError as exc:
        raise BadSampleError("bad_label", str(exc)) from exc


class RankStream(IterableDataset):
    """The items of one rank; inside a DataLoader worker it is that worker's slot. `returned`: one queue per
    worker on which the main process hands back the indices of shared buffers it has copied out (`own_batch`)."""

    def __init__(self, spec: WorkerSpec, start: WorkerStart, returned: list[Any] | None = None) -> None:
        super().__init__()
        self.spec, self.start, self.returned = spec, start, returned

    def __iter__(self) -> Iterator[Batch | Filler]:
        spec = self.spec
        info = get_worker_info()
        worker = info.id if info is not None else 0
        open_shard, cache = shard_opener(spec.storage, spec.cache_dir, spec.cache_max_bytes)
        buffers = None
        if info is not None and self.returned is not None:
            buffers = SharedBuffers(worker, self.returned[worker])
        producer = SlotProducer(spec, open_shard, SlotCounters(cache), buffers)
        plan, progress = self.start.plan, self.start.progress
        while True:
            own = plan.rank_slots(spec.rank)
            slot = own[worker].slot
            lead, items = round_robin([s.batches for s in own], [progress.get(s.slot, (0, 0))[1] for s in own])
            position, done = progress.get(slot, (0, 0))
            yield from producer.items(plan, slot, position, done, items, lead=worker < lead)
            if not spec.train:  # evaluation: one pass
                return
            plan, progress = train_plan(spec.counts, plan.split, plan.seed, plan.epoch + 1), {}


def round_robin(quotas: list[int], done: list[int]) -> tuple[int, int]:
    """Where a rank's DataLoader round-robin resumes: (workers that first emit a filler, items per worker).

    A fresh segment: every worker emits max(quotas) items (batches, then fillers). After `done[w]` batches of
    worker w were delivered, the next batch in the original order comes from worker `lead`; workers before it
    start with one filler so that the restarted round-robin (which begins at worker 0) keeps the original order.
    """
    k, delivered, rounds = len(quotas), sum(done), max(quotas, default=0)
    last, count = -1, 0
    for n in range(rounds * k):
        if count == delivered:
            break
        if n // k < quotas[n % k]:
            count, last = count + 1, n
    consumed = [(last - w) // k + 1 if w <= last else 0 for w in range(k)]
    if [min(q, c) for q, c in zip(quotas, consumed, strict=True)] != list(done):  # not a round-robin history
        return 0, max((q - d for q, d in zip(quotas, done, strict=True)), default=0)
    lead = (last + 1) % k
    return lead, rounds - (last + 1) // k


def start_workers(spec: WorkerSpec, start: WorkerStart, workers: int) -> tuple[Iterator[Batch | Filler], list[Any]]:
    """The rank's items, from `workers` DataLoader worker processes (0: made in this process), and the queues on
    which `own_batch` hands each worker's shared buffers back."""
    if workers == 0:
        return iter(RankStream(spec, start)), []
    context = _worker_context()
    returned = [context.Queue() for _ in range(workers)]
    loader = DataLoader(RankStream(spec, start, returned), batch_size=None, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), multiprocessing_context=context,
                        worker_init_fn=functools.partial(_init_worker, dict(os.environ), os.getpid(),
                                                         _logging_setup()))
    return iter(loader), returned


def _worker_context() -> multiprocessing.context.BaseContext:
    """DataLoader workers start from a fork server, not by forking this process: a plain fork copies the locks
    held by this process's other threads (fsspec's IO loop, read-ahead threads, logging handlers, Ray's threads)
    and can deadlock the child, as seen in CI. The server imports this module once, so workers start fast."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _logging_setup() -> tuple[int, str | None]:
    """This process's root log level and format, for its workers (a fork server's child starts unconfigured)."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    return root.getEffectiveLevel(), formatter._fmt if formatter is not None else None


def _init_worker(environment: dict[str, str], main_pid: int, logging_setup: tuple[int, str | None],
                 worker_id: int) -> None:
    """Give a worker this process's current environment (credentials, endpoints) and logging (so that its INFO
    lines, such as "storage back after", are seen), as a fork would: the fork server's own are the ones it had when
    it started, possibly before they were set. And end it when the main process is gone (`_exit_with`)."""
    del worker_id
    os.environ.clear()
    os.environ.update(environment)
    level, fmt = logging_setup
    logging.basicConfig(level=level, format=fmt)
    _exit_with(main_pid)


def _exit_with(main_pid: int) -> None:
    """End this worker as soon as the process `main_pid` is gone, however it died (SIGKILL, an out-of-memory kill,
    a Ray actor killed). A worker started from the fork server is the server's child: torch's watchdog, which
    checks the worker's parent, never sees the main process die, and the worker and the server (which lives while
    any of its children holds its pipe) would keep each other, and the resource tracker, alive forever."""
    def watch() -> None:
        try:
            handle = os.pidfd_open(main_pid)  # Linux >= 5.3: readable once the process has exited
        except (AttributeError, OSError):
            handle = None
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _exists(main_pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="main-process-watch", daemon=True).start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
