"""The streaming loader: WebDataset shards from object storage to uint8 batches, exact epochs, resumable.

Design (the plan itself is in `pipeline.data.plan`):

- Slots. Each (rank, DataLoader worker) pair is a slot that reads its own shards. Every process computes the same
  epoch plan from the manifest: shards shuffled by (seed, epoch), balanced over ranks then workers by sample count,
  a per-slot quota of full batches trimmed so that every rank has the same number of batches per epoch. Batches are
  built inside the workers (per-rank batch size; DataLoader(batch_size=None)). The split is our own rather than
  webdataset's `split_by_node`/`split_by_worker`, which deal shards round-robin and cannot give exact, equal
  per-rank batch counts or a computable position.
- Order. A slot emits its samples window by window (consecutive shards holding >= shuffle_buffer samples), each
  window in a permutation seeded by (seed, epoch, segment, slot, window). The order depends on manifest counts only.
- Alignment. Every worker of a rank emits the same number of items per epoch (real batches, then tiny "tick"
  fillers the main process drops), so the DataLoader's strict round-robin never mixes two epochs; after a restore,
  workers before the next worker in the old round-robin emit one filler first, so the order continues exactly.
- Reading. Tars are parsed with webdataset's `tar_file_iterator`/`group_by_keys` from `pipeline.storage.open_read`
  streams (or the local shard cache, `pipeline.data.cache`), in a thread per slot that reads ahead of decoding
  (network reads release the GIL); it holds at most the current window plus `shuffle_buffer` raw samples.
  Workers build batches in shared memory buffers that they reuse: the main process copies each batch out (on
  CUDA the pin-memory thread's copy is that copy) and hands the buffer back, cheaper than a fresh shared-memory
  file per batch. The small index tensors travel inline with the pickled batch.
- Position. Each batch carries (epoch, segment, slot, batch index, position = planned samples the slot has emitted).
  The main process records what it has handed to the training loop, so prefetched batches are not counted;
  `state_dict()` is that record. Restored with the same split, a slot re-plans its order and continues at its
  position: shards it has finished are never opened, and consumed samples of the current window are read past
  without decoding. Restored with another split (world size, loader workers, batch size, shuffle settings), the
  samples not yet consumed (every old slot's consumed set is computable from its position) are re-split as a new
  segment of the same epoch, with its own quotas; the next epoch uses the new split. Needs every old rank's state,
  i.e. `{"ranks": [state of rank 0, ...]}`. Only batches delivered after the checkpoint (in flight) can repeat.
- Bad data. Undecodable images ("bad_image"), missing or malformed labels ("bad_label"), and samples a shard did
  not deliver ("truncated_shard" when it died midway or ended early, "corrupt_shard" when no sample could be read)
  are skipped, counted, and logged with shard URL and key (first 10, then every 100th per worker). Counts travel
  in the batches to the main process, which raises `BadDataError` when the bad fraction of its samples exceeds
  `data.max_bad_fraction` (checked from `data.bad_fraction_min_samples` samples on, and at every epoch end).
  Permanent storage errors (missing shard, access denied) raise, naming the URL; reads that fail midway re-open
  the object at the same offset with the storage layer's retries.
- Short slots (training). Quotas are fixed up front, so batch counts never change: a slot first spends the
  samples it would otherwise drop at the epoch end; if bad samples still leave it short, it replays its own
  stream from the start and fills its last batches with its earliest good samples, counted as "refilled" (a
  documented repeat). A slot with no good sample at all pads with `valid=False` entries ("padded").
- Evaluation. Manifest order, every sample once, batches padded with `valid=False` entries so that every rank
  yields the same number of batches (big_vision style); bad samples become padding too.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.config import AugmentConfig, DataConfig, StorageConfig
from pipeline.data.cache import ShardCache
from pipeline.data.decode import BadSample, decode_image, parse_labels
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.data.plan import EpochPlan, Split, check_shard_split, eval_plan, resumed_plan, train_plan
from pipeline.storage import StorageError, open_read, with_retries

log = logging.getLogger(__name__)

STATE_FORMAT = "pipeline.data.ShardStream"
STATE_VERSION = 1
_READ_AHEAD = 64  # raw samples a slot's reader thread may hold beyond what decoding has asked for
_LOG_FIRST, _LOG_EVERY = 10, 100
_IMAGE_KEYS = ("jpg", "jpeg", "png")


class BadDataError(RuntimeError):
    """Too many corrupt samples: the message names the worst shards and the latest bad sample."""


# ----------------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One rank's batch. Images stay uint8 on the host; `to_device` normalises them and builds multi-hot targets."""

    images: torch.Tensor  # uint8 (B, 3, H, W), channels-last memory (each image HWC, as decoded)
    label_ids: torch.Tensor  # int64 (L,): the class ids of every sample, concatenated
    label_offsets: torch.Tensor  # int64 (B + 1,): sample i has label_ids[offsets[i]:offsets[i + 1]]
    keys: list[str]  # sample keys ("" for padding)
    valid: torch.Tensor  # bool (B,): False for padding entries (evaluation; never counted)
    sample_ids: torch.Tensor  # int64 (B,): index in the whole dataset (manifest order); -1 for padding
    epoch: int
    segment: int
    slot: int
    index: int  # batch index within the slot's quota in this epoch segment
    position: int  # planned samples the slot has emitted after this batch
    stats: dict[str, Any] = field(default_factory=dict)  # the slot's counters since its previous item
    buffer: tuple[int, int] | None = None  # (worker, index): the worker's reusable buffer holding the images

    def __len__(self) -> int:
        return len(self.keys)

    def labels(self, i: int) -> list[int]:
        return self.label_ids[self.label_offsets[i]:self.label_offsets[i + 1]].tolist()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (worker -> main process) with the small index tensors as numpy arrays, which travel inline:
        torch sends every tensor through its own shared-memory file and a descriptor handed over a socket, ~0.6 ms
        of CPU per tensor in all (measured), more than the rest of the hand-off. The images do go that way."""
        return {**self.__dict__, **{name: getattr(self, name).numpy() for name in _INLINE}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, **{name: torch.from_numpy(state[name]) for name in _INLINE}})

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (CUDA only)."""
        return dataclasses.replace(self, images=self.images.pin_memory(), label_ids=self.label_ids.pin_memory(),
                                   label_offsets=self.label_offsets.pin_memory())


_INLINE = ("label_ids", "label_offsets", "valid", "sample_ids")


@dataclass
class _Tick:
    """A filler item that keeps the DataLoader's round-robin aligned; carries counters, never reaches the loop."""

    epoch: int
    segment: int
    slot: int
    stats: dict[str, Any]


def to_device(batch: Batch, device: torch.device | str, num_classes: int,
              channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) on `device`: images uint8 (B, 3, H, W), still in pixel values (the model's own
    `preprocess_input` maps them to its input range, on the device, after the 4x cheaper uint8 copy); targets
    float32 multi-hot (B, num_classes), built on the device from the sparse ids. Padding rows are all zero."""
    if batch.label_ids.numel() and int(batch.label_ids.max()) >= num_classes:
        raise ValueError(f"batch has class id {int(batch.label_ids.max())} but num_classes={num_classes}")
    images = batch.images.to(device, non_blocking=True)  # layout changes on uint8 move a quarter of fp32 bytes
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    size = len(batch.label_offsets) - 1
    rows = torch.repeat_interleave(torch.arange(size), batch.label_offsets.diff())
    targets = torch.zeros(size, num_classes, device=device, dtype=torch.float32)
    targets[rows.to(device, non_blocking=True), batch.label_ids.to(device, non_blocking=True)] = 1.0
    return images, targets


# ------------------------------------------------------------------------------------------------ shard reading


class _ReopeningReader:
    """A shard stream that survives a failed read midway: re-open at the same offset (storage-layer retries)."""

    def __init__(self, url: str, storage: StorageConfig | None) -> None:
        self.url, self.storage = url, storage
        self._handle = open_read(url, storage)
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._handle.read(size)
        except StorageError:
            raise
        except Exception as exc:
            log.warning("read of %s failed at byte %d (%s: %s); re-opening", self.url, self._offset,
                        type(exc).__name__, exc)
            data = with_retries(lambda: self._reopen_and_read(size), what=f"read {self.url} at byte {self._offset}",
                                storage=self.storage)
        self._offset += len(data)
        return data

    def _reopen_and_read(self, size: int) -> bytes:
        with contextlib.suppress(Exception):
            self._handle.close()
        self._handle = open_read(self.url, self.storage)
        self._handle.seek(self._offset)
        return self._handle.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._handle.close()


@dataclass(frozen=True)
class _End:
    part: int
    samples: int  # samples the shard delivered
    error: str | None  # why it stopped early, if it did


def _read_parts(plan: EpochPlan, slot: int, urls: list[str], counts: list[int], wanted: dict[int, set[int] | None],
                open_shard: Any) -> Iterator[tuple[int, int, dict] | _End]:
    """Raw samples of a slot's parts in read order: (part, sample index, sample), then `_End` per part.

    Parts whose `wanted` set is empty are not opened; samples not wanted are read past, never decoded.
    """
    for pi, part in enumerate(plan.slots[slot].parts):
        want = wanted.get(pi)
        if want is not None and not want:
            continue
        url = urls[part.shard]
        keep = set(part.sample_indices()) if part.indices is not None else None
        delivered, error = 0, None
        stream = open_shard(url)  # permanent errors propagate: they name the URL
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                k, delivered = delivered, delivered + 1
                if k >= counts[part.shard]:
                    if k == counts[part.shard]:
                        log.warning("%s holds more samples than the manifest's %d; the extra ones are ignored",
                                    url, counts[part.shard])
                    continue
                if (keep is None or k in keep) and (want is None or k in want):
                    yield pi, k, sample
            if hasattr(stream, "drain"):
                stream.drain()  # let the cache publish its copy
        except StorageError:
            raise
        except Exception as exc:  # truncated or corrupt tar
            error = f"{type(exc).__name__}: {exc}"
        finally:
            stream.close()
        if error is None and delivered < counts[part.shard]:
            error = f"ended after {delivered} of {counts[part.shard]} samples"
        if error is not None:
            log.warning("shard %s: %s", url, error)
        yield _End(pi, delivered, error)


class _ReadAhead:
    """Runs a reader generator in a thread (network reads release the GIL) with a bounded queue."""

    _DONE = object()

    def __init__(self, source: Iterator, depth: int = _READ_AHEAD) -> None:
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="shard-reader")
        self._thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
        finally:
            source.close()  # type: ignore[attr-defined]

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        return self._unwrap(self._queue.get())

    def poll(self) -> Any | None:
        """The next item if one is ready, else None (never blocks)."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        return self._unwrap(item)

    def _unwrap(self, item: Any) -> Any:
        if item is self._DONE:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------- the slots


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs (picklable)."""

    urls: list[str]
    counts: list[int]
    split: Split
    rank: int
    train: bool
    seed: int
    image_size: int
    augment: AugmentConfig
    decoder: str
    fast_train_decode: bool
    num_classes: int
    storage: StorageConfig | None
    cache_dir: str | None
    cache_max_bytes: int


@dataclass(frozen=True)
class _Start:
    epoch: int
    history: tuple[tuple[Split, Mapping[int, int]], ...]
    progress: Mapping[int, tuple[int, int]]  # own slot -> (position, batches delivered)


class _Tally:
    """A slot's counters since its last emitted item, plus rate-limited logging of bad samples."""

    def __init__(self) -> None:
        self.logged = 0
        self.reset()

    def reset(self) -> None:
        self.good = self.refilled = self.padded = 0
        self.bad: dict[str, int] = {}
        self.bad_shards: dict[str, int] = {}
        self.last_bad: str | None = None

    def skip(self, reason: str, url: str, key: str, detail: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        self.bad_shards[url] = self.bad_shards.get(url, 0) + 1
        self.last_bad = f"{url} key {key} ({reason}: {detail})"
        self.logged += 1
        if self.logged <= _LOG_FIRST or self.logged % _LOG_EVERY == 0:
            log.warning("skipping sample %s key %s: %s: %s (%d skipped by this worker)", url, key, reason, detail,
                        self.logged)

    def take(self, cache: ShardCache | None) -> dict[str, Any]:
        stats = {"good": self.good, "bad": self.bad, "bad_shards": self.bad_shards, "last_bad": self.last_bad,
                 "refilled": self.refilled, "padded": self.padded}
        if cache is not None:
            stats["cache_hits"], stats["cache_misses"] = cache.hits, cache.misses
            cache.hits = cache.misses = 0
        self.reset()
        return stats


class _SharedBuffers:
    """A DataLoader worker's shared-memory image buffers, reused once the main process holds its own copy.

    A fresh shared-memory buffer per batch costs the kernel ~5 ms per 8.5 MB batch (allocating, zeroing and
    mapping the pages, then tearing them down; measured), more than the main process copying the batch out (~1.9 ms;
    on CUDA the pin-memory thread copies it anyway) and sending the buffer's index back on `returned`.
    """

    LIMIT = 6  # per worker: the DataLoader's prefetch (2), the batch being built, the one being copied, and room

    def __init__(self, worker: int, returned: Any) -> None:
        self.worker, self._returned = worker, returned
        self._buffers: list[torch.UntypedStorage] = []
        self._free: list[int] = []
        self._warned = False

    def take(self, nbytes: int) -> tuple[int, torch.UntypedStorage]:
        """(index, storage) of a free buffer; index -1 for a one-off buffer when every pooled one stays out."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._free.append(self._returned.get_nowait())
        if not self._free and len(self._buffers) == self.LIMIT:  # a return may still be on its way
            with contextlib.suppress(queue.Empty):
                self._free.append(self._returned.get(timeout=1.0))
        if self._free:
            index = self._free.pop()
            assert self._buffers[index].nbytes() == nbytes, "a worker's batches all have one size"
            return index, self._buffers[index]
        storage = torch.UntypedStorage._new_shared(nbytes)
        if len(self._buffers) < self.LIMIT:
            self._buffers.append(storage)
            return len(self._buffers) - 1, storage
        if not self._warned:
            self._warned = True
            log.warning("DataLoader worker %d: all %d shared batch buffers are out; using one-off buffers (slower)",
                        self.worker, self.LIMIT)
        return -1, storage


def _own(batch: Batch, returned: list[Any]) -> Batch:
    """`batch` with its images in this process's memory; the worker may then reuse the shared buffer."""
    assert batch.buffer is not None
    images = batch.images
    if not images.is_pinned():  # else the pin-memory thread has copied them already
        images = torch.empty_like(images).copy_(images)  # keeps channels-last
    worker, index = batch.buffer
    returned[worker].put(index)
    return dataclasses.replace(batch, images=images, buffer=None)


class _BatchBuilder:
    def __init__(self, size: int, image_size: int, buffers: _SharedBuffers | None = None) -> None:
        self.size, self.image_size, self._buffers = size, image_size, buffers
        self._new()

    def _new(self) -> None:
        self._images: torch.Tensor | None = None  # taken at the first slot(): a builder left empty holds no buffer
        self.buffer: tuple[int, int] | None = None
        self.ids: list[int] = []
        self.offsets = [0]
        self.keys: list[str] = []
        self.sample_ids: list[int] = []

    @property
    def images(self) -> torch.Tensor:
        """(B, 3, H, W) uint8 in channels-last memory, the layout images decode in (`pipeline.data.decode`)."""
        if self._images is None:
            side = self.image_size
            if self._buffers is not None:  # a DataLoader worker: build the batch in one of its shared buffers,
                # so that sending it to the main process copies nothing here
                index, storage = self._buffers.take(self.size * 3 * side ** 2)
                self.buffer = (self._buffers.worker, index) if index >= 0 else None
                hwc = torch.empty(0, dtype=torch.uint8).set_(storage).view(self.size, side, side, 3)
            else:
                hwc = torch.empty((self.size, side, side, 3), dtype=torch.uint8)
            self._images = hwc.permute(0, 3, 1, 2)
        return self._images

    def __len__(self) -> int:
        return len(self.keys)

    def slot(self) -> torch.Tensor:
        """Where the next sample's image is decoded to (`add` then records it)."""
        return self.images[len(self.keys)]

    def add(self, labels: list[int], key: str, sample_id: int = -1) -> None:
        """Record the sample whose image is in `slot()`."""
        self.ids.extend(labels)
        self.offsets.append(len(self.ids))
        self.keys.append(key)
        self.sample_ids.append(sample_id)

    def take(self, valid: int, **where: Any) -> Batch:
        while len(self.keys) < self.size:  # padding
            self.slot().zero_()
            self.add([], "")
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[:valid] = True
        batch = Batch(self.images, torch.tensor(self.ids, dtype=torch.int64),
                      torch.tensor(self.offsets, dtype=torch.int64), self.keys, mask,
                      torch.tensor(self.sample_ids, dtype=torch.int64), buffer=self.buffer, **where)
        self._new()
        return batch


class _Slot:
    """Produces one slot's items for one epoch segment: its quota of batches, then fillers up to `items`."""

    def __init__(self, spec: _Spec, cache: ShardCache | None, tally: _Tally,
                 buffers: _SharedBuffers | None = None) -> None:
        self.spec, self.cache, self.tally, self.buffers = spec, cache, tally, buffers
        self._replay: Iterator | None = None  # a short slot's second pass over its own stream
        self._barren = False  # the slot has no good sample at all

    def _open(self, url: str) -> BinaryIO:
        if self.cache is not None:
            return self.cache.open(url)
        return _ReopeningReader(url, self.spec.storage)  # type: ignore[return-value]

    def _samples(self, plan: EpochPlan, slot: int, start: int, count_bad: bool,
                 destination: Callable[[], torch.Tensor], tag: str = "") -> Iterator[tuple[int, list[int], str, int]]:
        """(position, labels, key, sample id) of the slot's good samples in plan order from `start`, each image
        decoded into `destination()` (the batch's next slot) before it is yielded.

        The sample id is the sample's index in the whole dataset (manifest shard order), the same on every rank.
        """
        spec, sp = self.spec, plan.slots[slot]
        first_id = [0, *itertools.accumulate(spec.counts)]
        wanted: dict[int, set[int] | None] = {}
        offset = 0
        for w, size in enumerate(sp.window_sizes):  # skip what was consumed before `start`: cheap resume
            if start >= offset + size:
                wanted.update({pi: set() for pi in sp.window_parts(w)})
            elif start > offset:
                items, order = plan.window_items(slot, w), plan.window_order(slot, w)
                for pi in sp.window_parts(w):
                    wanted[pi] = set()
                for t in range(start - offset, size):
                    pi, k = items[order[t]]
                    wanted[pi].add(k)  # type: ignore[union-attr]
            offset += size
        reader = _ReadAhead(_read_parts(plan, slot, spec.urls, spec.counts, wanted, self._open))
        available: dict[tuple[int, int], dict] = {}
        ended: dict[int, _End] = {}

        def store(item: tuple[int, int, dict] | _End) -> None:
            if isinstance(item, _End):
                ended[item.part] = item
            else:
                available[(item[0], item[1])] = item[2]

        # Besides what the current window needs, keep up to `shuffle_buffer` samples of the next one, so the
        # reader thread streams ahead while this thread decodes (no stall at window starts).
        ahead = max(plan.split.shuffle_buffer, 2 * plan.split.batch_size)
        ends = list(itertools.accumulate(sp.window_sizes))
        try:
            for position, pi, k in plan.planned_items(slot, start):
                while (pi, k) not in available and pi not in ended:
                    store(next(reader))
                limit = ahead + ends[bisect.bisect_right(ends, position)] - position
                with contextlib.suppress(StopIteration):
                    while len(available) < limit and (item := reader.poll()) is not None:
                        store(item)
                sample = available.pop((pi, k), None)
                url = spec.urls[sp.parts[pi].shard]
                if sample is None:
                    end = ended[pi]
                    if count_bad:
                        reason = "corrupt_shard" if end.samples == 0 else "truncated_shard"
                        self.tally.skip(reason, url, f"#{k}", end.error or "missing")
                    continue
                key = str(sample.get("__key__", f"#{k}"))
                try:
                    labels = parse_labels(sample.get("json"), spec.num_classes)
                    data = next((sample[e] for e in _IMAGE_KEYS if e in sample), None)
                    if data is None:
                        raise BadSample("bad_image", f"no image member (.{'/.'.join(_IMAGE_KEYS)})")
                    rng = random.Random(f"{plan.seed}:{plan.epoch}:{plan.segment}:{slot}:{position}{tag}")
                    decode_image(data, spec.image_size, spec.augment, train=spec.train, rng=rng,
                                 decoder=spec.decoder,  # type: ignore[arg-type]
                                 fast_train_decode=spec.fast_train_decode, out=destination())
                except BadSample as exc:
                    if count_bad:
                        self.tally.skip(exc.reason, url, key, exc.detail)
                    continue
                if count_bad:
                    self.tally.good += 1
                yield position, labels, key, first_id[sp.parts[pi].shard] + k
        finally:
            reader.close()

    def items(self, plan: EpochPlan, slot: int, start: int, done: int, items: int,
              lead: bool = False) -> Iterator[Batch | _Tick]:
        """Batches `done`..quota-1 of the slot from planned position `start`, then fillers up to `items` in all
        (`lead`: one filler first)."""
        spec, quota, samples = self.spec, plan.slots[slot].batches, plan.slots[slot].samples
        builder = _BatchBuilder(plan.split.batch_size, spec.image_size, self.buffers)
        emitted = 0
        if lead:
            items -= 1
            yield _Tick(plan.epoch, plan.segment, slot, self.tally.take(self.cache))

        def batch(valid: int, position: int) -> Batch:
            return builder.take(valid, epoch=plan.epoch, segment=plan.segment, slot=slot, index=done + emitted,
                                position=position, stats=self.tally.take(self.cache))

        if done < quota:
            stream = self._samples(plan, slot, start, count_bad=True, destination=builder.slot)
            for position, labels, key, sample_id in stream:
                builder.add(labels, key, sample_id)
                if len(builder) == builder.size:
                    yield batch(builder.size, position + 1)
                    emitted += 1
                    if done + emitted == quota:
                        break
            stream.close()
        while done + emitted < quota:
            if spec.train:  # a short slot: repeat its earliest good samples rather than change the batch count
                self._refill(plan, slot, builder)
            yield batch(len(builder), samples)  # evaluation: padding after the last sample
            emitted += 1
        if self._replay is not None:
            self._replay.close()  # type: ignore[attr-defined]
        self._replay, self._barren = None, False
        for _ in range(items - emitted):
            yield _Tick(plan.epoch, plan.segment, slot, self.tally.take(self.cache))

    def _refill(self, plan: EpochPlan, slot: int, builder: _BatchBuilder) -> None:
        """Fill the builder with the slot's earliest good samples, again and again; padding if it has none."""
        if self._replay is None:
            log.warning("epoch %d slot %d ran short of good samples (bad data): repeating its earliest samples",
                        plan.epoch, slot)
        while len(builder) < builder.size:
            got = next(self._replay, None) if self._replay is not None else None
            if got is None and not self._barren:
                self._replay = self._samples(plan, slot, 0, count_bad=False, destination=builder.slot,
                                             tag=":refill")
                got = next(self._replay, None)
                self._barren = got is None  # not one good sample in the whole slot: pad from now on
            if got is None:
                self.tally.padded += builder.size - len(builder)
                break
            builder.add(*got[1:])
            self.tally.refilled += 1


class _RankStream(IterableDataset):
    """The items of one rank; inside a DataLoader worker it is that worker's slot. `returned`: one queue per
    worker on which the main process hands back the indices of shared buffers it has copied out (`_own`)."""

    def __init__(self, spec: _Spec, start: _Start | None, returned: list[Any] | None = None) -> None:
        super().__init__()
        self.spec, self.start, self.returned = spec, start, returned

    def __iter__(self) -> Iterator[Batch | _Tick]:
        spec = self.spec
        info = get_worker_info()
        slot = spec.rank * spec.split.workers + (info.id if info is not None else 0)
        cache = None
        if spec.cache_dir is not None:
            cache = ShardCache(spec.cache_dir, spec.cache_max_bytes, spec.storage,
                               opener=lambda url: _ReopeningReader(url, spec.storage))  # type: ignore[arg-type,return-value]
        buffers = None
        if info is not None and self.returned is not None:
            buffers = _SharedBuffers(info.id, self.returned[info.id])
        producer = _Slot(spec, cache, _Tally(), buffers)
        if not spec.train:
            plan = eval_plan(spec.counts, spec.split)
            yield from producer.items(plan, slot, 0, 0, plan.items_per_worker(spec.rank))
            return
        assert self.start is not None
        epoch, history, progress = self.start.epoch, self.start.history, self.start.progress
        while True:
            plan = resumed_plan(spec.counts, history, spec.split, spec.seed, epoch)
            own = plan.rank_slots(spec.rank)
            lead, items = _round_robin([s.batches for s in own], [progress.get(s.slot, (0, 0))[1] for s in own])
            position, done = progress.get(slot, (0, 0))
            worker = slot - own[0].slot
            yield from producer.items(plan, slot, position, done, items, lead=worker < lead)
            epoch, history, progress = epoch + 1, (), {}


def _round_robin(quotas: list[int], done: list[int]) -> tuple[int, int]:
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


# ------------------------------------------------------------------------------------------------ the stream


def _worker_context() -> multiprocessing.context.BaseContext:
    """DataLoader workers start from a fork server, not by forking this process: a plain fork copies the locks
    held by this process's other threads (fsspec's IO loop, read-ahead threads, logging handlers, Ray's threads)
    and can deadlock the child, as seen in CI. The server imports this module once, so workers start fast."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.data.loader"])
    return context


def _adopt_environment(environment: dict[str, str], worker_id: int) -> None:
    """Give a worker this process's current environment (credentials, endpoints), as a fork would: the fork
    server's own environment is the one it had when it started, possibly before they were set."""
    del worker_id
    os.environ.clear()
    os.environ.update(environment)


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
        counts = [s.samples for s in self.manifest.shards]
        split = Split(world_size, max(1, data.loader_workers), batch_size,
                      data.shuffle_buffer if train else 0, data.shuffle_shards and train)
        if train:
            check_shard_split(self.manifest, world_size, data.loader_workers, batch_size)
        cache_bytes = int(data.cache_max_gb * 2**30)
        self._spec = _Spec(self.manifest.shard_urls(prefix), counts, split, rank, train, data.seed, data.image_size,
                           data.augment, data.decoder, data.fast_train_decode,
                           num_classes or self.manifest.num_classes, storage, data.cache_dir, cache_bytes)
        self._epoch = 0
        self._history: tuple[tuple[Split, Mapping[int, int]], ...] = ()
        self._progress: dict[int, tuple[int, int]] = {}
        self._plans: dict[tuple[int, int], EpochPlan] = {}
        self._entered: set[tuple[int, int]] = set()
        self._stats: dict[str, float] = {"batches": 0, "samples": 0, "good": 0, "refilled": 0, "padded": 0,
                                         "dropped_epoch_end": 0, "cache_hits": 0, "cache_misses": 0,
                                         "data_wait_s": 0.0}
        self._bad: dict[str, int] = {}
        self._bad_shards: dict[str, int] = {}
        self._last_bad: str | None = None
        self._started: float | None = None
        self._per_epoch: int | None = None

    # ------------------------------------------------------------------------------------------------- plans

    @property
    def split(self) -> Split:
        return self._spec.split

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (or of the last one, until its epoch is complete)."""
        return self._epoch

    def plan(self) -> EpochPlan:
        """The plan of the current epoch segment (evaluation: of the pass)."""
        spec = self._spec
        key = (self._epoch, len(self._history))
        if key not in self._plans:
            self._plans.clear()
            self._plans[key] = (resumed_plan(spec.counts, self._history, spec.split, spec.seed, self._epoch)
                                if self.train else eval_plan(spec.counts, spec.split))
        return self._plans[key]

    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a full epoch (evaluation: in the pass); the same for every epoch.

        (Balancing sorts shards by size, so every epoch gets the same slot loads, whatever the shuffle.)
        An epoch re-split after a restore with another world size has its own count: `plan().batches_per_rank`.
        """
        if self._per_epoch is None:
            spec = self._spec
            plan = (train_plan(spec.counts, spec.split, spec.seed, 0) if self.train
                    else eval_plan(spec.counts, spec.split))
            self._per_epoch = plan.batches_per_rank
        return self._per_epoch

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
        spec = self._spec
        start = _Start(self._epoch, self._history, dict(self._progress)) if self.train else None
        workers = self.data.loader_workers
        if workers == 0:
            returned: list[Any] = []
            source: Iterator = iter(_RankStream(spec, start))
        else:
            context = _worker_context()
            returned = [context.Queue() for _ in range(workers)]
            source = iter(DataLoader(_RankStream(spec, start, returned), batch_size=None, num_workers=workers,
                                     pin_memory=torch.cuda.is_available(), multiprocessing_context=context,
                                     worker_init_fn=functools.partial(_adopt_environment, dict(os.environ))))
        self._enter(self.plan())
        delivered = sum(b for _, b in self._progress.values()) if self.train else 0
        request = time.perf_counter()
        if self._started is None:
            self._started = request
        try:
            for item in source:
                self._absorb(item.stats)
                if isinstance(item, _Tick):
                    continue
                if item.buffer is not None:
                    item = _own(item, returned)
                if self.train and (item.epoch, item.segment) != (self._epoch, len(self._history)):
                    self._epoch, self._history, self._progress, delivered = item.epoch, (), {}, 0
                    self._enter(self.plan())
                plan = self.plan()
                if self.train:
                    self._progress[item.slot] = (item.position, item.index + 1)
                delivered += 1
                self._check_bad(end=delivered == plan.batches_per_rank)
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
        if stats.get("last_bad"):
            self._last_bad = stats["last_bad"]

    def _check_bad(self, end: bool) -> None:
        bad = sum(self._bad.values())
        seen = bad + int(self._stats["good"])
        if not bad or (seen < self.data.bad_fraction_min_samples and not end):
            return
        if bad / seen > self.data.max_bad_fraction:
            worst = sorted(self._bad_shards.items(), key=lambda kv: -kv[1])[:5]
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(self._bad.items()))
            shards = "; ".join(f"{url} ({n})" for url, n in worst)
            raise BadDataError(
                f"{bad} of {seen} samples read by rank {self.rank} were bad ({bad / seen:.1%} > "
                f"data.max_bad_fraction={self.data.max_bad_fraction}): {reasons}. Worst shards: {shards}. "
                f"Latest: {self._last_bad}")

    # ------------------------------------------------------------------------------------------------ position

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: what it has handed out (not what workers prefetched). JSON-serialisable."""
        plan = self.plan()
        own = [s for s in plan.rank_slots(self.rank)] if self.train else []
        epoch, history, progress = self._epoch, self._history, self._progress
        if own and all(progress.get(s.slot, (0, 0))[1] >= s.batches for s in own):
            epoch, history, progress = epoch + 1, (), {}  # the epoch is complete on every rank
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "rank": self.rank, "seed": self._spec.seed,
            "epoch": epoch, "manifest": {"shards": len(self._spec.counts), "samples": sum(self._spec.counts)},
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
        spec = self._spec
        if first["seed"] != spec.seed:
            log.warning("data.seed=%d but the checkpoint's loader used seed %d; keeping %d", spec.seed,
                        first["seed"], first["seed"])
            self._spec = _with_seed(spec, int(first["seed"]))
        epoch = int(first["epoch"])
        self._plans.clear()
        fingerprint = {"shards": len(spec.counts), "samples": sum(spec.counts)}
        if first["manifest"] != fingerprint:
            log.warning("the dataset changed since the checkpoint (%s, now %s): restarting epoch %d from its start",
                        first["manifest"], fingerprint, epoch)
            self._epoch, self._history, self._progress = epoch, (), {}
            return
        history = tuple((Split.from_dict(h["split"]), {int(a): int(b) for a, b in h["positions"]})
                        for h in first["history"])
        old = Split.from_dict(first["split"])
        merged = {int(slot): (int(p), int(b)) for s in states for slot, p, b in s["slots"]}
        ranks_given = sorted({int(s["rank"]) for s in states})
        plan = resumed_plan(spec.counts, history, old, self._spec.seed, epoch)
        if old == self.split:
            if self.rank not in ranks_given:
                raise ValueError(f"no loader state for rank {self.rank} (got ranks {ranks_given})")
            own = plan.rank_slots(self.rank)
            self._epoch, self._history = epoch, history
            self._progress = {s.slot: merged[s.slot] for s in own if s.slot in merged}
        else:
            missing = sorted(set(range(old.world_size)) - set(ranks_given))
            if missing:
                raise ValueError(
                    f"the checkpoint's loader ran with {old.world_size} ranks x {old.workers} workers and this one "
                    f"with {self.split.world_size} x {self.split.workers}: re-splitting needs every old rank's state "
                    f"({{'ranks': [...]}}), but ranks {missing} are missing")
            if all(merged.get(s.slot, (0, 0))[1] >= s.batches for s in plan.slots):
                self._epoch, self._history, self._progress = epoch + 1, (), {}
            else:
                positions = {s.slot: merged.get(s.slot, (0, 0))[0] for s in plan.slots}
                self._epoch, self._history, self._progress = epoch, (*history, (old, positions)), {}
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
            "skipped": float(bad), "bad_fraction": bad / (bad + stats["good"]) if bad + stats["good"] else 0.0,
            "refilled": stats["refilled"], "padded": stats["padded"], "dropped_epoch_end": stats["dropped_epoch_end"],
            "cache_hits": stats["cache_hits"], "cache_misses": stats["cache_misses"],
        }
        for reason, n in sorted(self._bad.items()):
            out[f"skipped_{reason}"] = float(n)
        return {k: float(v) for k, v in out.items()}


def _with_seed(spec: _Spec, seed: int) -> _Spec:
    return dataclasses.replace(spec, seed=seed)
