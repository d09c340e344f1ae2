"""One rank's stream of batches (`ShardStream`): exact epochs, a resumable position, metrics, the bad-data check.

WebDataset shards go from object storage to uint8 batches: the epoch plan (`pipeline.data.loading.plan`) says which
samples each (rank, loader worker) slot reads in which order; the workers (`pipeline.data.loading.workers`) read
(`pipeline.data.loading.shard_reader`), decode and batch them (`pipeline.data.loading.batch`); this module is the main
process's side: it plans each epoch segment once, starts the workers, and keeps the position and the counters.

- Position. Each batch carries (epoch, segment, slot, batch index, position = planned samples the slot has emitted).
  The main process records what it has handed to the training loop, so prefetched batches are not counted;
  `state_dict()` is that record. Restored with the same split, a slot re-plans its order and continues at its
  position: shards it has finished are never opened, and consumed samples of the current window are read past
  without decoding. Restored with another split (world size, loader workers, batch size, shuffle settings), the
  samples not yet consumed (every old slot's consumed set is computable from its position) are re-split as a new
  segment of the same epoch, with its own quotas; the next epoch uses the new split. Needs every old rank's state,
  i.e. `{"ranks": [state of rank 0, ...]}`. Only batches delivered after the checkpoint (in flight) can repeat.
- Bad data. Workers skip and count bad samples (`pipeline.data.loading.workers`); the counts travel in the batches to
  the main process, which raises `BadDataError` when the bad fraction of the samples the rank has read exceeds
  `data.max_bad_fraction`, judged once it has read `data.bad_data_window` samples (bad ones cluster by shard: a fair
  verdict needs several shards), at every epoch end, and earlier only when more samples are bad than a full window may
  hold (the window's verdict is then certain). The message states what it was judged on.
- Evaluation. Manifest order, every sample once, batches padded with `valid=False` entries so that every rank
  yields the same number of batches (big_vision style); bad samples become padding too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pipeline.config import DataConfig, StorageConfig
from pipeline.data.format import LabelReader, Manifest, read_classes, read_manifest
from pipeline.data.loading.batch import Batch, own_batch
from pipeline.data.loading.plan import EpochPlan, Split, check_shard_split, eval_plan, resumed_plan
from pipeline.data.loading.workers import Filler, WorkerSpec, WorkerStart, start_workers

log = logging.getLogger(__name__)

STATE_FORMAT = "pipeline.data.ShardStream"  # saved in checkpoints: a format name, not where the class lives
STATE_VERSION = 1

History = tuple[tuple[Split, Mapping[int, int]], ...]  # (split, {slot: position}) of earlier segments of the epoch


class BadDataError(RuntimeError):
    """Too many corrupt samples: the message names the worst shards and the latest bad sample."""


def _rank_states(state: Mapping[str, Any] | list) -> list[Mapping[str, Any]]:
    """The rank states in a `load_state_dict` argument, checked to be this format and saved at the same step."""
    states = list(state["ranks"]) if isinstance(state, Mapping) and "ranks" in state else (
        list(state) if isinstance(state, list) else [state])
    if not states:
        raise ValueError("empty loader state")
    first = states[0]
    for s in states:
        if s.get("format") != STATE_FORMAT or s.get("version") != STATE_VERSION:
            raise ValueError(f"loader state of format {s.get('format')!r} version {s.get('version')!r}: this "
                             f"loader reads {STATE_FORMAT!r} version {STATE_VERSION}")
        for name in ("seed", "epoch", "history", "split", "manifest"):
            if s[name] != first[name]:
                raise ValueError(f"loader states of different ranks disagree on {name!r}: {s[name]!r} vs "
                                 f"{first[name]!r} (were they saved at different steps?)")
    return states


def label_reader(prefix: str, manifest: Manifest, num_classes: int | None = None,
                 storage: StorageConfig | None = None) -> LabelReader:
    """How the loader reads the labels of the dataset at `prefix`: its manifest's sample format, with the class
    names of its classes.tsv when labels are written as names."""
    fmt = manifest.sample_format
    names = {c.name: c.id for c in read_classes(prefix, manifest, storage)} if fmt.values == "names" else {}
    return LabelReader(fmt, num_classes or manifest.num_classes, names)


class ShardStream:
    """One rank's stream of `Batch`es from the dataset at `prefix` (holding manifest.json).

    Training: endless; epochs follow each other (`Batch.epoch`), every rank gets `batches_per_epoch()` batches
    per epoch, no sample twice in an epoch. Evaluation: one pass, every sample exactly once across ranks, every
    rank the same number of batches, padding marked `valid=False`. `state_dict()`/`load_state_dict()` save and
    restore the position (see the module docstring); call `load_state_dict` before iterating.
    """

    def __init__(self, prefix: str, data: DataConfig, *, batch_size: int, rank: int, world_size: int, train: bool,
                 storage: StorageConfig | None = None, num_classes: int | None = None,
                 manifest: Manifest | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.prefix, self.data, self.rank, self.train = prefix, data, rank, train
        self.manifest = manifest if manifest is not None else read_manifest(prefix, storage)
        self._split = Split(world_size, max(1, data.loader_workers), batch_size,
                            data.shuffle_buffer if train else 0, data.shuffle_shards and train)
        if train:
            check_shard_split(self.manifest, world_size, data.loader_workers, batch_size)
        self._seed = data.seed
        self._spec = WorkerSpec(self.manifest.shard_urls(prefix), [s.samples for s in self.manifest.shards], rank,
                                train, data.image_size, data.augment, data.decoder, data.fast_train_decode,
                                label_reader(prefix, self.manifest, num_classes, storage), storage, data.cache_dir,
                                int(data.cache_max_gb * 2**30))
        self._entered: set[tuple[int, int]] = set()
        self._stats: dict[str, float] = {"batches": 0, "samples": 0, "good": 0, "refilled": 0, "padded": 0,
                                         "dropped_epoch_end": 0, "cache_hits": 0, "cache_misses": 0,
                                         "data_wait_s": 0.0}
        self._bad: dict[str, int] = {}
        self._bad_shards: dict[str, int] = {}
        self._shards_read: set[str] = set()
        self._last_bad: str | None = None
        self._started: float | None = None
        self._move_to(0, (), {})
        # Balancing sorts shards by size, so every fresh epoch gets the same slot loads, whatever the shuffle.
        self._per_epoch = self._plan.batches_per_rank

    # ------------------------------------------------------------------------------------------------- plans

    @property
    def split(self) -> Split:
        return self._split

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (or of the last one, until its epoch is complete)."""
        return self._epoch

    def plan(self) -> EpochPlan:
        """The plan of the current epoch segment (evaluation: of the pass)."""
        return self._plan

    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a full epoch (evaluation: in the pass); the same for every epoch.

        An epoch re-split after a restore with another world size has its own count: `plan().batches_per_rank`.
        """
        return self._per_epoch

    def _move_to(self, epoch: int, history: History, progress: dict[int, tuple[int, int]],
                 plan: EpochPlan | None = None) -> None:
        """Set the position, and its segment's plan: the one place this process plans (workers get the plan)."""
        counts = self._spec.counts
        if plan is None:
            plan = (resumed_plan(counts, history, self._split, self._seed, epoch) if self.train
                    else eval_plan(counts, self._split))
        self._epoch, self._history, self._progress, self._plan = epoch, history, progress, plan

    def _enter(self, plan: EpochPlan) -> None:
        key = (plan.epoch, plan.segment)
        if key in self._entered:
            return
        self._entered.add(key)
        self._stats["dropped_epoch_end"] += plan.dropped
        if self.train:
            what = f"epoch {plan.epoch}" + (f" (re-split segment {plan.segment})" if plan.segment else "")
            (log.info if self.rank == 0 else log.debug)(
                "%s: %d batches of %d per rank x %d ranks from %d samples; %d dropped at the epoch end "
                "(per-worker remainders and shard imbalance)", what, plan.batches_per_rank, plan.split.batch_size,
                plan.split.world_size, plan.samples, plan.dropped)

    # ------------------------------------------------------------------------------------------------ iterate

    def __iter__(self) -> Iterator[Batch]:
        source, returned = start_workers(self._spec, WorkerStart(self._plan, dict(self._progress)),
                                         self.data.loader_workers)
        self._enter(self._plan)
        delivered = sum(b for _, b in self._progress.values())
        request = time.perf_counter()
        if self._started is None:
            self._started = request
        try:
            for item in source:
                self._absorb(item.stats)
                if isinstance(item, Filler):
                    continue
                if item.buffer is not None:
                    item = own_batch(item, returned)
                if self.train and (item.epoch, item.segment) != (self._epoch, len(self._history)):
                    self._move_to(item.epoch, (), {})
                    delivered = 0
                    self._enter(self._plan)
                if self.train:
                    self._progress[item.slot] = (item.position, item.index + 1)
                delivered += 1
                self._check_bad(end=delivered == self._plan.batches_per_rank)
                self._stats["batches"] += 1
                self._stats["samples"] += int(item.valid.sum())
                self._stats["data_wait_s"] += time.perf_counter() - request
                yield item
                request = time.perf_counter()
        finally:
            del source

    def _absorb(self, stats: Mapping[str, Any]) -> None:
        for name in ("good", "refilled", "padded", "cache_hits", "cache_misses"):
            self._stats[name] += stats.get(name, 0)
        for reason, n in stats.get("bad", {}).items():
            self._bad[reason] = self._bad.get(reason, 0) + n
        for url, n in stats.get("bad_shards", {}).items():
            self._bad_shards[url] = self._bad_shards.get(url, 0) + n
        self._shards_read.update(stats.get("shards", ()))
        if stats.get("last_bad"):
            self._last_bad = stats["last_bad"]

    def _check_bad(self, end: bool) -> None:
        bad = sum(self._bad.values())
        seen = bad + int(self._stats["good"])
        limit, window = self.data.max_bad_fraction, self.data.bad_data_window
        if not bad or bad / seen <= limit:
            return
        if seen >= window:
            basis = f"a full window (data.bad_data_window={window})"
        elif end:
            basis = (f"the end of {f'epoch {self._epoch}' if self.train else 'the evaluation pass'}, short of a full "
                     f"window (data.bad_data_window={window})")
        elif bad > limit * window:
            basis = (f"before a full window (data.bad_data_window={window}): more than {limit:g} x {window} are bad "
                     "already, so no full window could pass")
        else:
            return
        worst = sorted(self._bad_shards.items(), key=lambda kv: -kv[1])[:5]
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self._bad.items()))
        shards = "; ".join(f"{url} ({n})" for url, n in worst)
        raise BadDataError(
            f"{bad} of {seen} samples read by rank {self.rank} were bad ({bad / seen:.1%} > "
            f"data.max_bad_fraction={limit}), judged on those {seen} samples from {len(self._shards_read)} "
            f"shard(s), {basis}. Skipped: {reasons}. Worst shards: {shards}. Latest: {self._last_bad}")

    # ------------------------------------------------------------------------------------------------ position

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: what it has handed out (not what workers prefetched). JSON-serialisable."""
        own = self._plan.rank_slots(self.rank) if self.train else []
        epoch, history, progress = self._epoch, self._history, self._progress
        if own and all(progress.get(s.slot, (0, 0))[1] >= s.batches for s in own):
            epoch, history, progress = epoch + 1, (), {}  # the epoch is complete on every rank
        counts = self._spec.counts
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "rank": self.rank, "seed": self._seed,
            "epoch": epoch, "manifest": {"shards": len(counts), "samples": sum(counts)},
            "history": [{"split": s.to_dict(), "positions": [[slot, p] for slot, p in sorted(pos.items())]}
                        for s, pos in history],
            "split": self.split.to_dict(),
            "slots": [[slot, p, b] for slot, (p, b) in sorted(progress.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any] | list) -> None:
        """Restore a position: one rank's state, or `{"ranks": [every rank's state]}` (needed to re-split).

        Same split as the checkpoint: continues exactly after the last delivered batch. Different split (world
        size, loader workers, batch size, shuffle settings): re-splits the samples the old ranks had not consumed.
        """
        if not self.train:
            return
        states = _rank_states(state)
        first = states[0]
        if first["seed"] != self._seed:
            log.warning("data.seed=%d but the checkpoint's loader used seed %d; keeping %d", self._seed,
                        first["seed"], first["seed"])
            self._seed = int(first["seed"])
        epoch = int(first["epoch"])
        counts = self._spec.counts
        fingerprint = {"shards": len(counts), "samples": sum(counts)}
        if first["manifest"] != fingerprint:
            log.warning("the dataset changed since the checkpoint (%s, now %s): restarting epoch %d from its start",
                        first["manifest"], fingerprint, epoch)
            self._move_to(epoch, (), {})
            return
        history = tuple((Split.from_dict(h["split"]), {int(a): int(b) for a, b in h["positions"]})
                        for h in first["history"])
        old = Split.from_dict(first["split"])
        merged = {int(slot): (int(p), int(b)) for s in states for slot, p, b in s["slots"]}
        ranks_given = sorted({int(s["rank"]) for s in states})
        plan = resumed_plan(counts, history, old, self._seed, epoch)  # the checkpoint's segment
        if old == self.split:
            if self.rank not in ranks_given:
                raise ValueError(f"no loader state for rank {self.rank} (got ranks {ranks_given})")
            own = plan.rank_slots(self.rank)
            self._move_to(epoch, history, {s.slot: merged[s.slot] for s in own if s.slot in merged}, plan)
            return
        missing = sorted(set(range(old.world_size)) - set(ranks_given))
        if missing:
            raise ValueError(
                f"the checkpoint's loader ran with {old.world_size} ranks x {old.workers} workers and this one "
                f"with {self.split.world_size} x {self.split.workers}: re-splitting needs every old rank's state "
                f"({{'ranks': [...]}}), but ranks {missing} are missing")
        if all(merged.get(s.slot, (0, 0))[1] >= s.batches for s in plan.slots):
            self._move_to(epoch + 1, (), {})
        else:
            positions = {s.slot: merged.get(s.slot, (0, 0))[0] for s in plan.slots}
            self._move_to(epoch, (*history, (old, positions)), {})
            log.info("re-splitting the rest of epoch %d from %d x %d to %d x %d slots", epoch, old.world_size,
                     old.workers, self.split.world_size, self.split.workers)

    # ------------------------------------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, float]:
        """Counters of this rank since construction: throughput, waiting, skipped by reason, drops, cache."""
        stats = dict(self._stats)
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        bad = sum(self._bad.values())
        out = {
            "epoch": float(self._epoch), "batches": stats["batches"], "samples": stats["samples"],
            "samples_per_s": stats["samples"] / elapsed if elapsed > 0 else 0.0,
            "data_wait_s": stats["data_wait_s"],
            "data_wait_fraction": stats["data_wait_s"] / elapsed if elapsed > 0 else 0.0,
            "read": bad + stats["good"],
            "skipped": float(bad), "bad_fraction": bad / (bad + stats["good"]) if bad + stats["good"] else 0.0,
            "refilled": stats["refilled"], "padded": stats["padded"], "dropped_epoch_end": stats["dropped_epoch_end"],
            "cache_hits": stats["cache_hits"], "cache_misses": stats["cache_misses"],
        }
        for reason, n in sorted(self._bad.items()):
            out[f"skipped_{reason}"] = float(n)
        return {k: float(v) for k, v in out.items()}


# `ShardStream.metrics()` entries that are not counts, and how the job's value follows from the ranks' values.
_JOB_EPOCH, _JOB_MEANS = "epoch", ("data_wait_s", "data_wait_fraction")


def job_metrics(ranks: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The whole job's loader metrics from every rank's `metrics()`: counts and throughput added up (a skip reason
    one rank never met counts 0 there), waiting averaged over ranks (they wait side by side), the epoch the furthest
    rank's, and the bad fraction that of the summed counts (not the mean of the ranks' fractions)."""
    job: dict[str, float] = {}
    for metrics in ranks:
        for key, value in metrics.items():
            job[key] = job.get(key, 0.0) + value
    if _JOB_EPOCH in job:
        job[_JOB_EPOCH] = max(metrics.get(_JOB_EPOCH, 0.0) for metrics in ranks)
    for key in _JOB_MEANS:
        if key in job:
            job[key] /= len(ranks)
    if "bad_fraction" in job:
        job["bad_fraction"] = job["skipped"] / job["read"] if job.get("read") else 0.0
    return job
