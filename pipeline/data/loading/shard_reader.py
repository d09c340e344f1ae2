"""Reading a slot's shards: open each (storage or local cache), parse its tars ahead of decoding, in plan order.

Tars are parsed by `pipeline.data.format.ShardSamples` (webdataset's tar iterator and grouping) from
`pipeline.storage.open_read` streams (or the local shard cache, `pipeline.data.loading.cache`), in a thread per slot
that reads ahead of decoding (network reads release the GIL); it holds at most the current window plus
`shuffle_buffer` raw samples, which `planned_samples` hands out in the plan's order. Restarted at a position,
consumed samples of the current window are read past without decoding and finished shards are never opened.
Permanent storage errors (missing shard, access denied) raise, naming the URL; reads that fail midway re-open the
object at the same offset with the storage layer's retries. A shard that dies midway or ends early ends its part
with the number of samples it delivered and why (`PartEnd`); the caller counts the rest as bad.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pipeline.config import StorageConfig
from pipeline.data.format import ShardSamples, tar_members
from pipeline.data.loading.cache import ShardCache
from pipeline.data.loading.plan import EpochPlan
from pipeline.storage import open_read

log = logging.getLogger(__name__)

READ_AHEAD = 64  # raw samples a slot's reader thread may hold beyond what decoding has asked for


ShardOpener = Callable[[str], BinaryIO]


def shard_opener(storage: StorageConfig | None, cache_dir: str | None,
                 cache_max_bytes: int) -> tuple[ShardOpener, ShardCache | None]:
    """How a worker opens shard URLs: through the local cache (also returned, for its counters) when there is one,
    else straight from storage; either way a failed read midway re-opens the object."""
    def reopening(url: str) -> BinaryIO:
        return open_read(url, storage, reopen=True)

    if cache_dir is None:
        return reopening, None
    cache = ShardCache(cache_dir, cache_max_bytes, storage, opener=reopening)
    return cache.open, cache


@dataclass(frozen=True)
class PartEnd:
    """The end of one part's samples in `read_parts`."""

    part: int
    samples: int  # samples the shard delivered
    error: str | None  # why it stopped early, if it did: where (sample, key, byte) and the cause


def _tar_error(exc: BaseException) -> str:
    """"Type: message" of a tar parsing error, without the " @ <stream>" webdataset appends to the message."""
    return f"{type(exc).__name__}: {str(exc).split(' @ ', 1)[0]}"



def read_parts(plan: EpochPlan, slot: int, urls: list[str], counts: list[int], wanted: dict[int, set[int] | None],
               open_shard: ShardOpener, log_ends: bool = True) -> Iterator[tuple[int, int, dict] | PartEnd]:
    """Raw samples of a slot's parts in read order: (part, sample index, sample), then `PartEnd` per part.

    Parts whose `wanted` set is empty are not opened; samples not wanted are read past, never decoded. A shard
    that ends early is logged (unless not `log_ends`: a second pass over the same shards).
    """
    for pi, part in enumerate(plan.slots[slot].parts):
        want = wanted.get(pi)
        if want is not None and not want:
            continue
        url, count = urls[part.shard], counts[part.shard]
        keep = set(part.sample_indices()) if part.indices is not None else None
        stream = open_shard(url)  # permanent errors propagate: they name the URL
        try:
            delivered, error = yield from _shard_samples(pi, url, count, keep, want, stream)
        finally:
            stream.close()
        yield _part_end(pi, url, delivered, count, error, log_ends)


def _shard_samples(pi: int, url: str, count: int, keep: set[int] | None, want: set[int] | None,
                   stream: BinaryIO) -> Generator[tuple[int, int, dict], None, tuple[int, str | None]]:
    """Yield part `pi`'s wanted samples from its open shard `stream`; return (samples delivered, why it ended
    early or None)."""
    reading = ShardSamples(tar_members(stream, url), finish=getattr(stream, "drain", None))  # drain: cache publishes
    for sample in reading:
        k = reading.samples - 1
        if k >= count:
            if k == count:
                log.warning("%s holds more samples than the manifest's %d; the extra ones are ignored", url, count)
            continue
        if (keep is None or k in keep) and (want is None or k in want):
            yield pi, k, sample
    ending = reading.ending(count)
    if ending == "corrupt":
        assert reading.error is not None
        return reading.samples, f"unreadable {_where(reading, stream)}: {_tar_error(reading.error)}"
    if ending == "truncated":  # an end-of-archive where the manifest promised more
        return reading.samples, f"ended {_where(reading, stream)}"
    return reading.samples, None


def _where(reading: ShardSamples, stream: BinaryIO) -> str:
    """Where a shard's reading stopped: after which sample (index and key), at which byte."""
    try:
        at = f", at byte {int(stream.tell())}"
    except Exception:  # a stream that cannot say
        at = ""
    delivered = reading.samples
    return (f"after sample {delivered - 1} (key {reading.last_key})" if delivered else "before its first sample") + at


def _part_end(part: int, url: str, delivered: int, expected: int, error: str | None, log_end: bool) -> PartEnd:
    """The part's `PartEnd`. An early end is logged once per shard: the samples it did not deliver are counted,
    not logged one by one."""
    if error is not None:
        error = f"{error}; {delivered} of {expected} samples delivered"
        if log_end:
            log.warning("shard %s: %s (the other %d are skipped)", url, error, expected - delivered)
    return PartEnd(part, delivered, error)


class ReadAhead:
    """Runs a reader generator in a thread (network reads release the GIL) with a bounded queue."""

    _DONE = object()

    def __init__(self, source: Iterator, depth: int = READ_AHEAD) -> None:
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
        if threading.current_thread() is not self._thread:  # a generator abandoned mid-read may be collected there
            self._thread.join(timeout=10)


def planned_samples(plan: EpochPlan, slot: int, start: int, urls: list[str], counts: list[int],
                    open_shard: ShardOpener, log_ends: bool = True) -> Iterator[tuple[int, int, int, dict | PartEnd]]:
    """(position, part, sample index, raw sample) of the slot's items in plan order from position `start`; for a
    sample its shard did not deliver, the part's `PartEnd` in place of the sample (see `read_parts`)."""
    sp = plan.slots[slot]
    reader = ReadAhead(read_parts(plan, slot, urls, counts, plan.wanted_from(slot, start), open_shard, log_ends))
    available: dict[tuple[int, int], dict] = {}
    ended: dict[int, PartEnd] = {}

    def store(item: tuple[int, int, dict] | PartEnd) -> None:
        if isinstance(item, PartEnd):
            ended[item.part] = item
        else:
            available[(item[0], item[1])] = item[2]

    # Besides what the current window needs, keep up to `shuffle_buffer` samples of the next one, so the reader
    # thread streams ahead while the caller decodes (no stall at window starts).
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
            yield position, pi, k, ended[pi] if sample is None else sample
    finally:
        reader.close()
