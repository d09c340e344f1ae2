"""Adopt an existing WebDataset shard set: write its manifest.json and classes.tsv without rewriting a shard.

Shards written by other tools (img2dataset, `webdataset.ShardWriter`, a dataset hub's export) keep their images
as `KEY.jpg`/`.png`/`.webp` and their labels in `KEY.cls`, a field of `KEY.json`, or `KEY.txt`. `index_shards`
finds the shards (`pipeline.data.adopt.sources`: a prefix, a brace pattern or a wids index), walks every tar's
headers in parallel with ranged reads (`pipeline.data.adopt.scan`: samples counted, label members read, images
skipped), builds the class list (a given classes file, else by frequency), and writes classes.tsv then
manifest.json (last) with the label mapping as its `sample_format` (`pipeline.data.format.sample_format`). The loader
then reads the shards as they are, with its usual guarantees.

Where: beside the shards (`out` None: the prefix, or the wids index's folder), or under another prefix when the
shard location is read-only; the manifest names shards outside `out` by absolute URL. A prefix that holds a
dataset written by jobs/make_shards.py is refused.

Bad samples (no image member, labels the mapping cannot read, an unknown class name with a given classes file)
are counted and named (shard URL and key); above `index.max_bad_fraction` (a wrong mapping, typically) indexing
stops with the first of them. A wids index's `nsamples` are checked against the tars walked; with
`index.frequencies=skip` and counts for every shard, no shard is opened at all.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.config import IndexConfig, StorageConfig
from pipeline.data.adopt.scan import ShardScan, scan_shard
from pipeline.data.adopt.sources import ShardList, list_shards
from pipeline.data.format import (
    MANIFEST_FILE,
    ClassInfo,
    LabelError,
    Manifest,
    ManifestError,
    RawLabel,
    SampleFormat,
    ShardInfo,
    classes_from_tsv,
    read_manifest,
    write_classes,
    write_manifest,
)
from pipeline.storage import absolute_url, exists, join_url, read_bytes

log = logging.getLogger(__name__)

EARLY_FAIL_SAMPLES = 200  # samples seen before a bad fraction above the limit stops indexing early


class AdoptError(ValueError):
    """Shards that cannot be indexed with the given mapping; the message names shard URLs and keys."""


@dataclass
class IndexReport:
    """What `index_shards` found and wrote."""

    out: str
    shards: ShardList
    manifest: Manifest
    classes: list[ClassInfo]
    scans: list[ShardScan]
    walked: int  # shards whose tars were read (0 when a wids index gave every count and labels were skipped)
    seconds: float
    bad_examples: list[str] = field(default_factory=list)

    @property
    def bad(self) -> Counter[str]:
        return sum((s.bad for s in self.scans), Counter())

    def summary(self) -> str:
        m, total = self.manifest, sum(s.bytes for s in self.scans)
        read = sum(s.bytes_read for s in self.scans)
        bad = self.bad
        lines = [f"indexed {len(m.shards)} shards ({self.shards.kind} {self.shards.source}), {m.num_samples:,} "
                 f"samples, {m.num_classes} classes; labels from .{m.sample_format.labels}"
                 + (f" field {m.sample_format.field!r}" if m.sample_format.labels == "json" else "")
                 + f" as {m.sample_format.values}",
                 f"walked {self.walked} tars: read {read / 2**20:,.1f} MiB of {total / 2**20:,.1f} MiB"
                 + (f" ({read / total:.2%})" if total else "") + f" in {self.seconds:.1f} s"]
        if bad:
            lines.append(f"bad samples (skipped by the loader): {sum(bad.values())} ("
                         + ", ".join(f"{r}={n}" for r, n in sorted(bad.items())) + "); first: " + self.bad_examples[0])
        lines.append(f"wrote {join_url(self.out, m.classes)} and {join_url(self.out, MANIFEST_FILE)}; train with "
                     f"data.train={self.out} model.num_classes={m.num_classes}")
        return "\n".join(lines)


def read_class_list(url: str, storage: StorageConfig | None = None) -> list[ClassInfo]:
    """Classes from a classes.tsv (ids, names, frequencies, weights) or a text file of one name per line."""
    text = read_bytes(url, storage).decode("utf-8-sig")
    if text.startswith("id\tname\ttrain_frequency"):
        return classes_from_tsv(text, source=url)
    names = text.rstrip("\n").split("\n")
    stripped = [n.strip() for n in names]
    if not text.strip() or any(not n for n in stripped):
        raise AdoptError(f"{url}: a class list needs one non-empty name per line (line "
                         f"{next((i + 1 for i, n in enumerate(stripped) if not n), 1)} is empty)")
    seen: dict[str, int] = {}
    for line, name in enumerate(stripped, start=1):
        if name in seen:
            raise AdoptError(f"{url}:{line}: class {name!r} is listed again (first on line {seen[name]})")
        seen[name] = line
    return [ClassInfo(id=i, name=n) for i, n in enumerate(stripped)]


def _label_check(given: list[ClassInfo] | None, num_classes: int | None,
                 classes_url: str | None) -> Callable[[Sequence[RawLabel]], None]:
    """What the indexer accepts as labels: known names (with a classes file), ids in range."""
    names = {c.name for c in given} if given is not None else None
    count = len(given) if given is not None else num_classes

    def check(raw: Sequence[RawLabel]) -> None:
        for label in raw:
            if isinstance(label, str):
                if names is not None and label not in names:
                    raise LabelError(f"class {label!r} is not in the classes file {classes_url} ({len(names)} "
                                     "classes)")
            elif label < 0:
                raise LabelError(f"class id {label} is negative")
            elif count is not None and label >= count:
                raise LabelError(f"class id {label} is outside 0..{count - 1}")

    return check


def _scan_all(shards: ShardList, fmt: SampleFormat, options: IndexConfig,
              check: Callable[[Sequence[RawLabel]], None] | None, storage: StorageConfig | None) -> list[ShardScan]:
    """Every shard's scan, walking the tars in parallel (a wids count stands in for one that is not walked)."""
    scans: list[ShardScan | None] = [None] * len(shards.urls)
    walk = [i for i, count in enumerate(shards.counts) if check is not None or count is None]
    for i in set(range(len(scans))) - set(walk):
        scans[i] = ShardScan(shards.urls[i], samples=shards.counts[i] or 0, bytes=shards.sizes[i] or 0,
                             good=shards.counts[i] or 0)
    if walk:
        log.info("indexing %d shards from %s: walking tar headers with %d KiB ranged reads, %d at a time%s",
                 len(walk), shards.source, options.block_kib, options.workers,
                 "" if check is None else f" (reading .{fmt.labels} members for class counts)")
    values = None if options.label_values == "auto" and fmt.labels == "cls" else options.label_values
    bar = tqdm(total=len(walk), desc="index shards", unit="shard", disable=not options.progress or not walk,
               dynamic_ncols=True)
    with bar, cf.ThreadPoolExecutor(options.workers) as pool:
        futures = {pool.submit(scan_shard, shards.urls[i], fmt, values=values, check=check, storage=storage,
                               block_size=options.block_kib * 1024): i for i in walk}
        try:
            for future in cf.as_completed(futures):
                scans[futures[future]] = future.result()
                done = [s for s in scans if s is not None]
                samples, read = sum(s.samples for s in done), sum(s.bytes_read for s in done)
                bar.set_postfix_str(f"{samples:,} samples, read {read / 2**20:,.1f} MiB of "
                                    f"{sum(s.bytes for s in done) / 2**20:,.1f}", refresh=False)
                bar.update(1)
                _check_bad(done, options.max_bad_fraction, final=False)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [s for s in scans if s is not None]


def _examples(scans: Sequence[ShardScan], limit: int = 20) -> list[str]:
    return [f"{s.url} key {key}: {reason}: {detail}" for s in scans for key, reason, detail in s.examples][:limit]


def _check_bad(scans: Sequence[ShardScan], limit: float, final: bool) -> None:
    bad = sum(sum(s.bad.values()) for s in scans)
    seen = sum(s.samples for s in scans)
    if bad and (final or seen >= EARLY_FAIL_SAMPLES) and bad / seen > limit:
        shown = "\n  ".join(_examples(scans, 5))
        raise AdoptError(f"{bad} of {seen} samples read so far are unusable ({bad / seen:.1%} > "
                         f"index.max_bad_fraction={limit}); is the label mapping right? First:\n  {shown}")


def _label_values(scans: Sequence[ShardScan], options: IndexConfig, fmt: SampleFormat) -> str:
    """ids or names: as configured, else as the shards hold them (all integers: ids; all strings: names)."""
    if options.label_values != "auto":
        return options.label_values
    if fmt.labels == "cls":
        return "ids"
    kinds = {kind: (s.url, key, label) for s in scans for kind, (key, label) in s.first_of_kind.items()}
    if "int" in kinds and "str" in kinds:
        (iu, ik, il), (su, sk, sl) = kinds["int"], kinds["str"]
        raise AdoptError(f"labels are both class ids ({il!r} in {iu} key {ik}) and names ({sl!r} in {su} key {sk}); "
                         "set index.label_values=ids or names")
    if not kinds:
        raise AdoptError("no labels were read (index.frequencies=skip?), so whether they are ids or names is not "
                         "known: set index.label_values")
    return "names" if "str" in kinds else "ids"


def _class_list(scans: Sequence[ShardScan], given: list[ClassInfo] | None, values: str,
                options: IndexConfig) -> list[ClassInfo]:
    """The classes with their train_frequency per `index.frequencies`."""
    counts: Counter[RawLabel] = sum((s.labels for s in scans), Counter())
    if given is not None:
        classes = given
    elif values == "names":
        ordered = sorted((k for k in counts if isinstance(k, str)), key=lambda n: (-counts[n], n))
        classes = [ClassInfo(id=i, name=n) for i, n in enumerate(ordered)]
    else:
        ids = [k for k in counts if isinstance(k, int)]
        count = options.num_classes or (max(ids) + 1 if ids else 0)
        classes = [ClassInfo(id=i, name=str(i)) for i in range(count)]
    if not classes:
        raise AdoptError("no classes: no labels were read and no index.classes or index.num_classes was given")
    if options.frequencies == "classes_file":
        return classes
    key = (lambda c: c.name) if values == "names" else (lambda c: c.id)
    return [ClassInfo(c.id, c.name, counts.get(key(c), 0) if options.frequencies == "count" else 0, c.weight)
            for c in classes]


def _check_options(options: IndexConfig, given: list[ClassInfo] | None) -> None:
    """Refuse settings that cannot give a class list, before any shard is read."""
    if options.frequencies == "classes_file" and (given is None or not any(c.train_frequency for c in given)):
        raise AdoptError("index.frequencies=classes_file needs index.classes to be a classes.tsv with frequencies")
    if options.frequencies != "skip":
        return
    if options.label_values == "auto" and options.labels != "cls":
        raise AdoptError("index.frequencies=skip reads no labels: set index.label_values=ids or names")
    if given is None and options.label_values == "names":
        raise AdoptError("index.frequencies=skip reads no labels, so the class names must come from index.classes")
    if given is None and options.num_classes is None:
        raise AdoptError("index.frequencies=skip reads no labels: give index.classes or index.num_classes")


def _refuse_own_dataset(out: str, storage: StorageConfig | None) -> None:
    """A prefix holding a dataset this project wrote keeps it: only an earlier index may be replaced."""
    if not exists(join_url(out, MANIFEST_FILE), storage):
        return
    try:
        indexed = "index" in read_manifest(out, storage).extra
    except ManifestError:
        indexed = False
    if not indexed:
        raise AdoptError(f"{out} already holds a {MANIFEST_FILE} not written by this indexer (jobs/make_shards.py's "
                         "or another tool's): write the index elsewhere (--out)")


def manifest_shard_name(url: str, out: str) -> str:
    """How the manifest names a shard: relative to `out` when it lies under it, else its absolute URL."""
    base = out.rstrip("/") + "/"
    return url[len(base):] if url.startswith(base) else url


def index_shards(source: str, out: str | None = None, options: IndexConfig | None = None,
                 storage: StorageConfig | None = None) -> IndexReport:
    """Write manifest.json and classes.tsv for the existing shards `source` names (see the module docstring)."""
    began = time.monotonic()
    options = options or IndexConfig()
    shards = list_shards(source, storage)
    out = absolute_url(out).rstrip("/") if out else shards.location
    _refuse_own_dataset(out, storage)
    given = read_class_list(options.classes, storage) if options.classes else None
    _check_options(options, given)
    placeholder = "ids" if options.labels == "cls" or options.label_values == "ids" else "names"
    fmt = SampleFormat(image=tuple(options.image_extensions), labels=options.labels, field=options.json_field,
                       values=placeholder)  # type: ignore[arg-type]
    check = None if options.frequencies == "skip" else _label_check(given, options.num_classes, options.classes)
    scans = _scan_all(shards, fmt, options, check, storage)
    _check_bad(scans, options.max_bad_fraction, final=True)
    for scan, count in zip(scans, shards.counts, strict=True):
        if count is not None and count != scan.samples:
            log.warning("%s: the wids index says %d samples, the tar holds %d; the manifest records %d", scan.url,
                        count, scan.samples, scan.samples)
        if scan.error:
            log.warning("%s: the tar breaks after %d samples (%s); the manifest records those", scan.url,
                        scan.samples, scan.error)
    values = _label_values(scans, options, fmt)
    fmt = SampleFormat(image=fmt.image, labels=fmt.labels, field=fmt.field, values=values)  # type: ignore[arg-type]
    classes = _class_list(scans, given, values, options)
    examples = _examples(scans)
    manifest = Manifest(
        num_classes=len(classes), labels=options.labels_kind, sample_format=fmt,
        shards=[ShardInfo(manifest_shard_name(s.url, out), s.samples, s.bytes) for s in scans if s.samples],
        extra={"index": _index_record(shards, scans, options, examples)})
    if not manifest.shards:
        raise AdoptError(f"{source}: the shards hold no samples")
    write_classes(out, classes, storage)
    write_manifest(out, manifest, storage)  # last: the dataset is visible only when complete
    walked = sum(1 for s, c in zip(scans, shards.counts, strict=True) if check is not None or c is None)
    return IndexReport(out=out, shards=shards, manifest=manifest, classes=classes, scans=scans, walked=walked,
                       seconds=time.monotonic() - began, bad_examples=examples)


def _index_record(shards: ShardList, scans: Sequence[ShardScan], options: IndexConfig,
                  examples: list[str]) -> dict[str, Any]:
    """The manifest's `extra.index`: where the shards came from and what indexing them found."""
    return {"source": shards.source, "kind": shards.kind, "classes_file": options.classes,
            "frequencies": options.frequencies, "bytes_read": sum(s.bytes_read for s in scans),
            "bad_samples": dict(sum((s.bad for s in scans), Counter())), "bad_examples": examples,
            "broken_shards": {s.url: s.error for s in scans if s.error}}
