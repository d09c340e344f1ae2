"""Count one shard's samples and read its labels by walking its tar headers with ranged reads, never its images.

A tar is a chain of 512-byte headers, each followed by its member's data. `scan_shard` opens the shard through
fsspec with a small read-ahead block (`index.block_kib`, 16 KiB by default) and walks the headers with Python's
`tarfile` in random-access mode: it seeks past every image body, so each member larger than a block costs one
ranged read of one block (its neighbours' headers and small label members ride along in it), and the bytes read
are about `block_size` per image instead of the image. Label members (`.cls`, `.json`, `.txt`) are small and
are read. Compressed tars (`.tar.gz`) cannot be walked that way; they are streamed whole, with a warning.

Samples are grouped exactly as the loader groups them (the same member filter as webdataset's
`tar_file_iterator`, then the loader's `pipeline.data.format.ShardSamples`: the key is the member name up to the
first dot of its basename), so the count is the count the loader will see. Each sample is checked the way the
loader checks it: an image member present (`pipeline.data.format.sample_format`), labels readable by the mapping;
a bad one is counted with its key.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from webdataset.tariterators import meta_prefix, meta_suffix

from pipeline.config import StorageConfig
from pipeline.data.format import LabelError, RawLabel, SampleFormat, ShardSamples, image_member, raw_labels
from pipeline.storage import filesystem, with_retries

log = logging.getLogger(__name__)

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members
MAX_EXAMPLES = 20  # bad samples kept by key per shard


@dataclass
class ShardScan:
    """What a shard holds: samples (as the loader counts them), bytes, bytes read to learn it, the labels of its
    good samples (each label once per sample), and its bad samples by reason with the first few keys."""

    url: str
    samples: int = 0
    bytes: int = 0
    bytes_read: int = 0
    good: int = 0
    labels: Counter[RawLabel] = field(default_factory=Counter)
    first_of_kind: dict[str, tuple[str, RawLabel]] = field(default_factory=dict)  # "int"/"str" -> (key, label)
    bad: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (key, reason, detail)
    error: str | None = None  # the tar broke here: samples counts those before the break

    def add_bad(self, key: str, reason: str, detail: str) -> None:
        self.bad[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((key, reason, detail))


class _CountingFile:
    """A file wrapper counting the bytes its reads return (the bytes read where the file has no fetch counter)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.returned = handle, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.returned += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()


def _regular_members(handle: _CountingFile, url: str, wanted: Callable[[str], bool], ranged: bool
                     ) -> Iterator[dict[str, Any]]:
    """{"fname", "data", "__url__"} per member, filtered as webdataset's `tar_file_iterator` does; `data` is read
    only for members `wanted` says (b"" for the others, which are seeked past)."""
    with tarfile.open(fileobj=handle, mode="r:" if ranged else "r|*") as tar:  # type: ignore[call-overload]
        while (info := tar.next()) is not None:
            tar.members = []  # keep memory flat on shards of many members
            name = info.name
            if not info.isreg() or _SKIP_META.match(name) or (
                    "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
                continue
            reader = tar.extractfile(info) if wanted(name) else None
            yield {"fname": name, "data": reader.read() if reader is not None else b"", "__url__": url}


def _label_member(fmt: SampleFormat) -> Callable[[str], bool]:
    tail = "." + fmt.labels

    def wanted(name: str) -> bool:
        return name.lower().endswith(tail)

    return wanted


def _check_sample(scan: ShardScan, sample: dict[str, Any], fmt: SampleFormat, values: str,
                  check: Callable[[Sequence[RawLabel]], object] | None) -> None:
    key = str(sample["__key__"])
    if image_member(sample, fmt) is None:
        scan.add_bad(key, "bad_image", f"no image member (.{'/.'.join(fmt.image)})")
        return
    if check is None:  # labels not read (frequencies skipped)
        scan.good += 1
        return
    try:
        raw = raw_labels(sample, fmt, values)  # type: ignore[arg-type]
        check(raw)
    except LabelError as exc:
        scan.add_bad(key, "bad_label", str(exc))
        return
    scan.good += 1
    for label in set(raw):
        scan.labels[label] += 1
        scan.first_of_kind.setdefault(type(label).__name__, (key, label))


def _walk(scan: ShardScan, handle: _CountingFile, fmt: SampleFormat, values: str,
          check: Callable[[Sequence[RawLabel]], object] | None, ranged: bool) -> None:
    wanted = _label_member(fmt) if check is not None else (lambda name: False)
    # a broken tar ends the walk; storage errors propagate (the shard is retried)
    reading = ShardSamples(_regular_members(handle, scan.url, wanted, ranged),
                           broken=(tarfile.TarError, ValueError, EOFError), passthrough=())
    for sample in reading:
        scan.samples += 1
        _check_sample(scan, sample, fmt, values, check)
    if reading.error is not None:
        scan.error = f"{type(reading.error).__name__}: {reading.error}"


def scan_shard(url: str, fmt: SampleFormat, *, values: Literal["ids", "names", "auto"] | None = None,
               check: Callable[[Sequence[RawLabel]], object] | None = None, storage: StorageConfig | None = None,
               block_size: int = 16 * 1024) -> ShardScan:
    """Walk the shard at `url` (see the module docstring). `check(raw labels)` raises LabelError for labels the
    dataset cannot use; None: labels are not read at all (only images are checked to be present). Transient
    storage errors retry the shard from its start; a tar that breaks midway keeps the samples before the break
    and names the error (`ShardScan.error`)."""
    fs, path = filesystem(url, storage)

    def attempt(ranged: bool) -> ShardScan:
        scan = ShardScan(url)
        with fs.open(path, "rb", block_size=block_size, cache_type="readahead") as raw:
            handle = _CountingFile(raw)
            scan.bytes = int(getattr(raw, "size", 0) or fs.size(path))
            try:
                _walk(scan, handle, fmt, values or fmt.values, check, ranged)
            finally:
                cache = getattr(raw, "cache", None)
                scan.bytes_read = int(getattr(cache, "total_requested_bytes", handle.returned))
        return scan

    scan = with_retries(lambda: attempt(True), what=f"index {url}", storage=storage)
    if scan.error is not None and scan.samples == 0 and "invalid header" in scan.error.lower():
        log.warning("%s: not a plain tar (%s); reading it whole as a compressed tar", url, scan.error)
        scan = with_retries(lambda: attempt(False), what=f"index {url}", storage=storage)
    return scan
