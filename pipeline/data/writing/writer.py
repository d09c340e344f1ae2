"""The resumable shard writer: samples -> shards of a target size, then classes.tsv and manifest.json last.

Formats: shards and sidecars `pipeline.data.writing.build`, the manifest and classes file
`pipeline.data.format.manifest`. Sources: `write_folder_shards` (a folder of images + a labels file,
`pipeline.data.writing.labels`), the demo (`pipeline.data.demo.prepare`), or `ShardWriter.write` with any iterable of
`Sample`s. Settings: `ShardsConfig` (the config's `shards` section). What a write did: `pipeline.data.writing.report`.

Shard boundaries are planned in input order, greedily, by each sample's estimated tar record size
(`pipeline.data.writing.sizing`); `samples_per_shard` plans by count instead (no size pass). The size aimed at is
`max_shard_mb`, lowered for an input sized beforehand (a sequence) so that it makes at least `min_shards` shards
(`planned_shard_bytes`; recorded in the sidecars as `target_bytes`, which a resumed run reuses). The plan depends
only on the input and the settings, which makes output deterministic and runs resumable: a re-run skips every
published shard (checking that its sidecar matches the plan) and writes only the missing ones. A prefix holding
shards of other settings, or from other inputs (`ShardWriter`'s `inputs`: a folder's URL and labels file), is
refused, unless `shards.overwrite`: then its manifest is removed first, those shards are rewritten, files beyond
the new set removed, and the new manifest written last. A shard from other inputs that holds no sample (a first
run against the wrong folder: every input "file not found") is rewritten without it. Worker processes each build
whole shards (`write_shard`). classes.tsv and then manifest.json are written from the sidecars once every shard is
published, so readers that see a manifest see complete shards.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from pipeline.config import ShardsConfig, StorageConfig
from pipeline.data.format import MANIFEST_FILE, ClassInfo, Manifest, ShardInfo, write_classes, write_manifest
from pipeline.data.writing.build import (
    KEY_RE,
    MAX_KEY_LEN,
    SHARD_FILE_RE,
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    Sample,
    ShardTask,
    init_worker,
    output_settings,
    set_progress,
    shard_name,
    sidecar_name,
    write_shard,
)
from pipeline.data.writing.labels import LabelsFileError, build_vocabulary, folder_samples, read_labels_file
from pipeline.data.writing.report import RejectedInput, ShardReport
from pipeline.data.writing.sizing import estimate_record, estimate_records, planned_shard_bytes, tar_bytes
from pipeline.storage import StorageError, absolute_url, filesystem, join_url, read_bytes, remove, with_retries

logger = logging.getLogger(__name__)


class ShardWriteError(RuntimeError):
    """Shards could not be written, or the prefix holds shards from another input/settings; names the URL."""


def num_workers(options: ShardsConfig) -> int:
    """`shards.workers`, with None meaning all cores."""
    return options.workers if options.workers is not None else (os.cpu_count() or 1)


def _process_context() -> multiprocessing.context.BaseContext:
    """Worker processes start from a clean server that imported this module once ("forkserver"): safe with the
    threads of s3fs/tqdm in this process, and without every worker paying the imports (webdataset pulls in torch:
    seconds per process on a busy 2-core machine). "spawn" where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "s3fs"])  # a missing preload module is skipped
    return ctx


class _Pushback:
    """An iterator of (index, Sample) that can take back one item."""

    def __init__(self, items: Iterator[tuple[int, Sample]]) -> None:
        self._items, self._back = items, None

    def push(self, item: tuple[int, Sample]) -> None:
        self._back = item

    def next(self) -> tuple[int, Sample] | None:
        if self._back is not None:
            item, self._back = self._back, None
            return item
        return next(self._items, None)


def _published_prefix(published: dict[int, dict[str, Any]]) -> tuple[int, int]:
    """(shards, input items) of the contiguous run of published shards from shard 0: a re-run skips them without
    reading their inputs."""
    shards, items = 0, 0
    while shards in published and published[shards]["start"] == items:
        items += published[shards]["items"]
        shards += 1
    return shards, items


SampleSource = Iterable[Sample | tuple[str, bytes, Sequence[int]]] | Callable[[int], Iterable[Sample]]


class ShardWriter:
    """Writes a dataset prefix `out` from samples labelled with the ids of `classes` (see the module docstring).

    `count_frequencies=True` (a training split) writes classes.tsv with train_frequency = the number of written
    samples carrying each class; `False` (an eval split given the training vocabulary) copies `classes` as they are,
    frequencies and weights included, so both splits share ids and weights.

    `inputs` says what the samples are (for a folder: its URL and the labels file's digest), recorded in every
    sidecar: the keys alone do not tell, since the same labels file read against another folder gives the same
    keys. A published shard from other inputs is refused unless `shards.overwrite`, or rewritten when it holds no
    sample (every input was missing or bad: a first run against the wrong folder must not decide a re-run's
    outcome). None: unknown (an iterator of the caller's), not checked.
    """

    def __init__(self, out: str, classes: Sequence[ClassInfo], *, count_frequencies: bool = True,
                 labels: Literal["sparse", "dense"] = "sparse", attribution: str = "",
                 extra: dict[str, Any] | None = None, options: ShardsConfig | None = None,
                 storage: StorageConfig | None = None, inputs: dict[str, Any] | None = None) -> None:
        if not classes or [c.id for c in classes] != list(range(len(classes))):
            raise ValueError("classes must be non-empty with ids 0..len-1 in order")
        if labels not in ("sparse", "dense"):
            raise ValueError(f"labels must be 'sparse' or 'dense', got {labels!r}")
        self.out = out
        self.classes = list(classes)
        self.count_frequencies = count_frequencies
        self.labels = labels
        self.attribution = attribution
        self.extra = dict(extra or {})
        self.options = options or ShardsConfig()
        self.storage = storage
        self.inputs = json.loads(json.dumps(inputs)) if inputs is not None else None  # as a sidecar reads back
        fingerprint = json.dumps({"writer": output_settings(self.options), "version": SIDECAR_VERSION,
                                  "classes": [c.name for c in self.classes]}, sort_keys=True)
        self.settings = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.target_bytes: int | None = None  # set per write when min_shards plans the shard size

    # -- published state ---------------------------------------------------------------------------------------

    def _published(self) -> tuple[dict[int, dict[str, Any]], list[str], list[int]]:
        """Sidecars of shards that are complete (sidecar + tar of the recorded size), the names at the prefix, and
        (with `overwrite`) the indices of shards written with other settings, to be rewritten."""
        fs, path = filesystem(self.out, self.storage)

        def listing() -> dict[str, int]:
            try:
                entries = fs.ls(path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return {}
            return {os.path.basename(str(e["name"]).rstrip("/")): int(e.get("size") or 0) for e in entries}

        sizes = with_retries(listing, what=f"list {self.out}", storage=self.storage)
        indices = sorted({int(m.group(1)) for n in sizes if (m := SHARD_FILE_RE.match(n)) and m.group(2) == "json"})
        with cf.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda i: read_bytes(join_url(self.out, sidecar_name(i)), self.storage), indices))
        published: dict[int, dict[str, Any]] = {}
        replaced: list[int] = []
        for index, text in zip(indices, texts, strict=True):
            side = self._sidecar(index, text)
            if side is None:
                continue
            if self._replace(index, side):
                replaced.append(index)
            elif side["samples"] == 0 or sizes.get(shard_name(index)) == side["bytes"]:
                published[index] = side
        return published, sorted(sizes), replaced

    def _sidecar(self, index: int, text: bytes) -> dict[str, Any] | None:
        """The sidecar of shard `index`, or None (logged: the shard is rewritten) when it is not one of ours."""
        try:
            side = json.loads(text)
            if side.get("format") == SIDECAR_FORMAT and side.get("index") == index:
                return side
        except (json.JSONDecodeError, AttributeError):
            pass
        logger.warning("%s is not a shard sidecar of this writer; its shard will be rewritten",
                       join_url(self.out, sidecar_name(index)))
        return None

    def _replace(self, index: int, side: dict[str, Any]) -> bool:
        """Whether published shard `index` is to be rewritten: written with other settings or from other inputs,
        with `overwrite`; from other inputs with no sample in it. Raises when it is to be kept neither way."""
        url = join_url(self.out, sidecar_name(index))
        if side.get("version") != SIDECAR_VERSION or side.get("settings") != self.settings:
            if self.options.overwrite:
                return True
            raise ShardWriteError(
                f"{url}: this shard was written with other settings or another class vocabulary "
                f"(sidecar settings {side.get('settings')!r}, this run {self.settings!r}; this run: "
                f"{output_settings(self.options)}); write to a new prefix, or add shards.overwrite=true to "
                "replace the dataset there (its manifest is removed first, the new one written last)")
        recorded = side.get("inputs")  # None: written before inputs were recorded, or by a caller who gave none
        if recorded is None or self.inputs is None or recorded == self.inputs:
            return False
        if self.options.overwrite or side["samples"] == 0:
            logger.warning("%s was written from other inputs (%s; this run: %s)%s: rewriting it", url,
                           _describe_inputs(recorded), _describe_inputs(self.inputs),
                           " and holds no sample" if side["samples"] == 0 else "; shards.overwrite=true")
            return True
        raise ShardWriteError(
            f"{url}: this shard was written from other inputs ({_describe_inputs(recorded)}) than this run's "
            f"({_describe_inputs(self.inputs)}); write to a new prefix, or add shards.overwrite=true to replace the "
            "dataset there")

    def _remove_manifest(self, replaced: list[int]) -> None:
        """`overwrite`: hide the old dataset before any of its shards is replaced (readers need a manifest)."""
        logger.warning("%s: replacing shards written there with other settings or from other inputs (%d shards to "
                       "rewrite, starting with %s): its manifest is removed now, the new one is written when every "
                       "shard is", self.out, len(replaced), shard_name(replaced[0]))
        remove(join_url(self.out, MANIFEST_FILE), self.storage)

    def _target_bytes(self, published: dict[int, dict[str, Any]], total_records: int) -> int | None:
        """The planned shard size when `min_shards` applies: the one published shards were planned with (a resumed
        run), else `planned_shard_bytes` of the input's estimated size."""
        if self.options.samples_per_shard or self.options.min_shards is None:
            return None
        if published:
            return next(iter(published.values())).get("target_bytes")
        return planned_shard_bytes(total_records, self.options)

    # -- planning ------------------------------------------------------------------------------------------------

    def _check(self, sample: Sample, seen: set[str]) -> Sample:
        if not isinstance(sample, Sample):
            key, image, labels = sample  # (key, image bytes, label ids)
            sample = Sample(key=key, labels=labels, image=image)
        if not KEY_RE.match(sample.key) or len(sample.key) > MAX_KEY_LEN:
            raise ValueError(f"sample key {sample.key!r} is not tar-safe: use letters, digits, '_' and '-' "
                             f"(no dots), at most {MAX_KEY_LEN} characters")
        if sample.key in seen:
            raise ValueError(f"sample key {sample.key!r} appears twice in the input")
        seen.add(sample.key)
        if (sample.image is None) == (sample.path is None):
            raise ValueError(f"sample {sample.key!r}: give exactly one of image (bytes) or path")
        n = len(self.classes)
        labels = sorted(set(sample.labels))
        if any(not isinstance(i, (int, np.integer)) or not 0 <= i < n for i in labels):
            raise ValueError(f"sample {sample.key!r}: labels {list(sample.labels)} must be class ids in 0..{n - 1}")
        if "labels" in sample.meta:
            raise ValueError(f"sample {sample.key!r}: meta must not contain 'labels'")
        return Sample(key=sample.key, labels=[int(i) for i in labels], image=sample.image, path=sample.path,
                      meta=sample.meta)

    def _plan(self, items: _Pushback, start_shard: int, start_item: int, published: dict[int, dict[str, Any]],
              estimate: Callable[[int, Sample], int]) -> Iterator[ShardTask]:
        """Greedy, in input order: close a shard when the next sample would push its estimated size over the
        target (or at the sample cap). Published shards on the way are skipped after checking they match."""
        index, position = start_shard, start_item
        while True:
            previous = published.get(index - 1)
            if previous is not None and previous["final"] and (item := items.next()) is not None:
                raise ShardWriteError(
                    f"{join_url(self.out, sidecar_name(index - 1))}: the input has more items (next: "
                    f"{item[1].key!r}) than when this last shard was written; write to a new prefix")
            side = published.get(index)
            if side is not None:
                self._skip_published(items, index, position, side)
                position += side["items"]
                index += 1
                continue
            group, final = self._next_group(items, estimate)
            if not group:
                return
            yield ShardTask(index=index, start=position, samples=group, final=final, out=self.out,
                            settings=self.settings, options=self.options, storage=self.storage,
                            target_bytes=self.target_bytes, inputs=self.inputs)
            position += len(group)
            index += 1

    def _skip_published(self, items: _Pushback, index: int, position: int, side: dict[str, Any]) -> None:
        """Read past the input items of published shard `index`, checking the input still starts it as it did."""
        url = join_url(self.out, sidecar_name(index))
        if side["start"] != position:
            raise ShardWriteError(f"{url}: published shard starts at input item {side['start']} but this "
                                  f"run's plan starts it at {position}; the input changed since it was "
                                  "written: write to a new prefix")
        for n in range(side["items"]):
            item = items.next()
            if item is None:
                raise ShardWriteError(f"{url}: the input has fewer items than when this shard was written")
            if n == 0 and item[1].key != side["first_key"]:
                raise ShardWriteError(f"{url}: the shard starts with sample {side['first_key']!r} but the "
                                      f"input now has {item[1].key!r} there; write to a new prefix")

    def _next_group(self, items: _Pushback, estimate: Callable[[int, Sample], int]) -> tuple[list[Sample], bool]:
        """The samples of the next shard, and whether the input ends with them (empty: it had ended)."""
        options = self.options
        cap = options.samples_per_shard or options.max_shard_samples
        group: list[Sample] = []
        records = 0
        while (item := items.next()) is not None:
            record = 0 if options.samples_per_shard else estimate(*item)
            target = self.target_bytes or options.max_shard_bytes
            if group and ((cap and len(group) >= cap) or tar_bytes(records + record) > target):
                items.push(item)
                return group, False
            group.append(item[1])
            records += record
        return group, True

    # -- running -------------------------------------------------------------------------------------------------

    def write(self, samples: SampleSource, total: int | None = None) -> ShardReport:
        """Write (or finish writing) the dataset from `samples`, then classes.tsv and manifest.json.

        `samples`: a sequence/iterable of `Sample` (or `(key, image_bytes, label_ids)` tuples), or a callable
        `start -> iterable of samples from input item `start` on`, which lets a resumed run skip generating the
        samples of published shards. Sequences of path samples are sized in parallel before writing.
        `total`: the number of input items, for the progress bar when `samples` has no len().
        """
        began = time.monotonic()
        options = self.options
        published, names, replaced = self._published()
        self.target_bytes = None
        if replaced:
            self._remove_manifest(replaced)
        first, skip_to = _published_prefix(published)
        sequence = isinstance(samples, Sequence)
        if sequence:
            total = len(samples)
            source: Iterable[Any] = samples[skip_to:]
        elif callable(samples):
            source = samples(skip_to)
        else:
            source, first, skip_to = samples, 0, 0
            if total is None and hasattr(samples, "__len__"):
                total = len(samples)  # type: ignore[arg-type]
        seen: set[str] = set()
        checked = ((skip_to + i, self._check(s, seen)) for i, s in enumerate(source))

        workers = num_workers(options)
        pool, counter = None, None
        if workers > 1:
            ctx = _process_context()
            counter = ctx.Value("q", 0)  # samples processed, summed over workers (progress bar)
            pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(counter,))
        results: dict[int, dict[str, Any]] = {}
        try:
            estimates: dict[int, int] = {}
            if sequence and not options.samples_per_shard:
                checked_list = list(checked)
                checked = iter(checked_list)
                estimates = estimate_records(self._unpublished(checked_list, published), options, self.storage, pool)
                self.target_bytes = self._target_bytes(published, sum(estimates.values()))

            def estimate(position: int, sample: Sample) -> int:
                value = estimates.pop(position, None)
                return value if value is not None else estimate_record(sample, options, self.storage)

            plan = self._plan(_Pushback(checked), first, skip_to, published, estimate)
            remaining = None if total is None else max(0, total - sum(s["items"] for s in published.values()))
            bar = tqdm(total=remaining, desc=f"shards -> {self.out}", unit="img", disable=not options.progress,
                       smoothing=0.1, dynamic_ncols=True)
            with bar:
                if pool is None:
                    self._run_here(plan, results, bar)
                else:
                    self._run_pool(pool, plan, results, bar, counter, workers)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self._finish(published, results, names, began, replacing=bool(replaced))

    def _run(self, fn: Callable[[], dict[str, Any]], task: ShardTask) -> dict[str, Any]:
        try:
            return fn()
        except (StorageError, OSError, ValueError) as exc:
            raise ShardWriteError(f"writing {join_url(self.out, shard_name(task.index))} failed: {exc}") from exc

    def _run_here(self, plan: Iterator[ShardTask], results: dict[int, dict[str, Any]], bar: tqdm) -> None:
        """Write the plan's shards one after the other in this process (`shards.workers` <= 1)."""
        set_progress(bar.update)
        try:
            for task in plan:
                results[task.index] = self._run(lambda t=task: write_shard(t), task)
        finally:
            set_progress(lambda n: None)

    def _run_pool(self, pool: cf.ProcessPoolExecutor, plan: Iterator[ShardTask], results: dict[int, dict[str, Any]],
                  bar: tqdm, counter: Any, workers: int) -> None:
        running: dict[cf.Future[dict[str, Any]], ShardTask] = {}

        def collect(block_until: int) -> None:
            while len(running) > block_until:
                done, _ = cf.wait(running, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                bar.update(counter.value - bar.n)
                for future in done:
                    task = running.pop(future)
                    results[task.index] = self._run(future.result, task)

        for task in plan:
            collect(workers)  # bounded: at most workers+1 shards' samples in flight
            running[pool.submit(write_shard, task)] = task
        collect(0)
        bar.update(counter.value - bar.n)

    @staticmethod
    def _unpublished(items: list[tuple[int, Sample]], published: dict[int, dict[str, Any]]) -> list[tuple[int, Sample]]:
        """The (position, sample) items outside published shards: those a run sizes."""
        covered = bytearray((items[-1][0] + 1) if items else 0)
        for side in published.values():
            stop = min(side["start"] + side["items"], len(covered))
            covered[side["start"]:stop] = b"\x01" * max(0, stop - side["start"])
        return [(p, s) for p, s in items if not covered[p]]

    def _finish(self, published: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]], names: list[str],
                began: float, replacing: bool = False) -> ShardReport:
        sidecars = {**published, **results}
        count = 0
        while count in sidecars and (count == 0 or not sidecars[count - 1]["final"]):
            count += 1
        if count == 0:
            raise ShardWriteError(f"{self.out}: the input has no samples")
        chain = [sidecars[i] for i in range(count)]
        if not chain[-1]["final"]:
            raise ShardWriteError(f"{self.out}: the input ended before {shard_name(count)} although earlier shards "
                                  "said more would follow; write to a new prefix")
        stale = [n for n in names if (m := SHARD_FILE_RE.match(n)) and int(m.group(1)) >= count]
        if stale and (self.options.overwrite or replacing):  # files of what this run replaces
            logger.info("%s: removing %d files of the replaced dataset beyond its new %d shards", self.out,
                        len(stale), count)
            for name in stale:
                remove(join_url(self.out, name), self.storage)
        elif stale:
            logger.warning("%s holds shard files beyond this dataset's %d shards (not in the manifest): %s",
                           self.out, count, ", ".join(stale[:6]))
        shards = [ShardInfo(url=s["shard"], samples=s["samples"], bytes=s["bytes"]) for s in chain if s["samples"]]
        bad = [RejectedInput(shard=s["shard"], **b) for s in chain for b in s["bad"]]
        reencoded: Counter[str] = Counter()
        label_counts: Counter[int] = Counter()
        for s in chain:
            reencoded.update(s["reencoded"])
            label_counts.update({int(k): v for k, v in s["label_counts"].items()})
        samples = sum(s.samples for s in shards)
        if samples == 0:
            first = bad[0] if bad else None
            raise ShardWriteError(f"{self.out}: none of the {len(bad)} inputs could be used"
                                  + (f" (first: {first.source}: {first.reason})" if first else ""))
        classes = ([ClassInfo(c.id, c.name, label_counts.get(c.id, 0), c.weight) for c in self.classes]
                   if self.count_frequencies else self.classes)
        extra = {**self.extra, "writer": {**output_settings(self.options), "settings_id": self.settings},
                 "input_items": sum(s["items"] for s in chain), "bad_samples": len(bad),
                 "reencoded": dict(sorted(reencoded.items()))}
        manifest = Manifest(num_classes=len(self.classes), shards=shards, labels=self.labels,
                            attribution=self.attribution, extra=extra)
        write_classes(self.out, classes, self.storage)
        write_manifest(self.out, manifest, self.storage)  # last: the dataset is visible only when complete
        written = sorted(i for i in results if i < count)
        return ShardReport(out=self.out, shards=shards, samples=samples, bad=bad, reencoded=dict(reencoded),
                           written_shards=written, skipped_shards=sorted(i for i in published if i < count),
                           processed_items=sum(results[i]["items"] for i in written),
                           seconds=time.monotonic() - began)


def _describe_inputs(inputs: dict[str, Any]) -> str:
    """`inputs` as a message names them: `key value` pairs, a digest shortened."""
    return ", ".join(f"{key} {str(value)[:12] if key.endswith('sha256') else value}" for key, value in inputs.items())


def folder_inputs(images: str, labels_file: str, storage: StorageConfig | None = None) -> dict[str, str]:
    """What identifies a folder source (`ShardWriter`'s `inputs`): the images folder as an absolute URL, and the
    labels file's content (its sha256), wherever that file lies."""
    digest = hashlib.sha256(read_bytes(labels_file, storage)).hexdigest()
    return {"images": absolute_url(images).rstrip("/"), "labels_sha256": digest}


def write_folder_shards(images: str, labels_file: str, out: str, *, vocabulary: Sequence[ClassInfo] | None = None,
                        labels: Literal["sparse", "dense"] = "sparse", attribution: str = "",
                        options: ShardsConfig | None = None, storage: StorageConfig | None = None) -> ShardReport:
    """Shards from a folder of images (local path or URL) and a labels file (`read_labels_file`).

    Without `vocabulary` the class ids are built from the labels file (`build_vocabulary`) and classes.tsv counts
    the written samples (a training split). With `vocabulary` (a training set's classes.tsv, `read_vocabulary`)
    its ids, frequencies and weights are kept (an eval split) and unknown class names are an error.
    """
    records = read_labels_file(labels_file, storage)
    classes = list(vocabulary) if vocabulary is not None else build_vocabulary(records)
    if not classes:
        raise LabelsFileError(f"{labels_file}: no class names in the file and no vocabulary given")
    samples = folder_samples(images, records, classes, source=labels_file)
    writer = ShardWriter(out, classes, count_frequencies=vocabulary is None, labels=labels, attribution=attribution,
                         extra={"source": {"images": images, "labels_file": labels_file}},
                         options=options, storage=storage, inputs=folder_inputs(images, labels_file, storage))
    return writer.write(samples)

