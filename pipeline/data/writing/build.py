"""Build one shard: read its inputs, prepare each image, write the tar locally, publish it, then its sidecar.

Output under the dataset prefix (the manifest and classes file: `pipeline.data.format.manifest`):

- `shard-000000.tar`, ...: per sample `KEY.jpg` (an RGB JPEG) and `KEY.json` (`{"labels": [class ids], ...meta}`),
  written with `webdataset.TarWriter` (members sorted, mtime 0, so the same input gives byte-identical tars);
- `shard-000000.json`, ...: a sidecar per shard (input range, sample count, bytes, bad inputs, label counts,
  the settings' fingerprint, what identifies the input), written after its tar; a shard is *published* when both
  exist and agree.

`write_shard` runs in the writer's worker processes: it builds the tar in a local temp file and publishes it
atomically with `upload_file`, so a crashed writer leaves no partial shard visible.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

from pipeline.config import ShardsConfig, StorageConfig
from pipeline.data.writing.images import BadImageError, prepare_image
from pipeline.storage import StorageError, join_url, read_bytes, upload_file, write_bytes

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "xception-pipeline-shard-sidecar"
SIDECAR_VERSION = 1
SHARD_FILE_RE = re.compile(r"^shard-(\d{6,})\.(tar|json)$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no dots: webdataset splits KEY.ext at the first dot
MAX_KEY_LEN = 90  # tar (ustar) member names are limited to 100 bytes: KEY + ".json"


@dataclass(frozen=True)
class Sample:
    """One input: `image` bytes in memory, or `path` (a local path or URL) read by the worker that writes it.

    `key` must be unique in the dataset and tar-safe (letters, digits, '_', '-'; no dots). `labels` are class ids.
    `meta` is JSON-serialisable and is stored beside "labels" in KEY.json.
    """

    key: str
    labels: Sequence[int]
    image: bytes | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """What to name in a report: the path if there is one, else the key."""
        return self.path or self.key



def sample_json(sample: Sample) -> bytes:
    """The KEY.json member: the sample's metadata and its class ids."""
    body = {**sample.meta, "labels": list(sample.labels)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def output_settings(options: ShardsConfig) -> dict[str, Any]:
    """The settings that determine the bytes written (recorded in sidecars and the manifest)."""
    settings = {"max_shard_bytes": options.max_shard_bytes, "max_shard_samples": options.max_shard_samples,
                "samples_per_shard": options.samples_per_shard, "max_image_side": options.max_image_side,
                "jpeg_quality": options.jpeg_quality}
    if options.samples_per_shard is None and options.min_shards is not None:  # they do not apply to cuts by count
        settings.update(min_shards=options.min_shards, min_shard_bytes=options.min_shard_bytes)
    return settings


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    return f"shard-{index:06d}.json"


@dataclass
class ShardTask:
    """One shard to build: input items `start`.. of the dataset at `out`; `final` if no items follow."""

    index: int
    start: int
    samples: list[Sample]
    final: bool
    out: str
    settings: str  # fingerprint of the output settings and classes (`ShardWriter.settings`)
    options: ShardsConfig
    storage: StorageConfig | None
    target_bytes: int | None = None  # the shard size planned for this dataset when min_shards lowered it
    inputs: dict[str, Any] | None = None  # what identifies the input (`ShardWriter.inputs`), recorded in the sidecar


_tick: Callable[[int], None] = lambda n: None  # noqa: E731  (set per process: progress of samples processed)


def set_progress(tick: Callable[[int], None]) -> None:
    """Make `write_shard` in this process call `tick(1)` per input item (the writer's progress bar)."""
    global _tick
    _tick = tick


def init_worker(counter: Any) -> None:
    """Pool initializer: count processed items into the shared `multiprocessing.Value` `counter`."""

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    set_progress(tick)


def _read_input(sample: Sample, storage: StorageConfig | None) -> bytes:
    if sample.image is not None:
        return sample.image
    assert sample.path is not None
    return read_bytes(sample.path, storage)


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Build one shard in a local temp file, publish it, then its sidecar; returns the sidecar."""
    name, options = shard_name(task.index), task.options
    url = join_url(task.out, name)
    bad: list[dict[str, str]] = []
    reencoded: Counter[str] = Counter()
    label_counts: Counter[int] = Counter()
    samples = 0
    fd, temp = tempfile.mkstemp(prefix=f"{name}.", suffix=".partial", dir=options.tmp_dir)
    try:
        with os.fdopen(fd, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0) as tar:
            for sample in task.samples:
                _tick(1)
                try:
                    prepared = prepare_image(_read_input(sample, task.storage), options.max_image_side,
                                             options.jpeg_quality)
                except BadImageError as exc:
                    bad.append({"key": sample.key, "source": sample.source, "reason": str(exc)})
                    continue
                except StorageError as exc:
                    if getattr(exc, "errno", None) != errno.ENOENT:  # a missing file is a bad input; else fatal
                        raise
                    bad.append({"key": sample.key, "source": sample.source, "reason": "file not found"})
                    continue
                tar.write({"__key__": sample.key, "jpg": prepared.jpeg, "json": sample_json(sample)})
                samples += 1
                label_counts.update(sample.labels)
                if prepared.reencoded:
                    reencoded[prepared.reencoded.split(" ")[0]] += 1
        size = os.path.getsize(temp)
        if samples:
            upload_file(temp, url, task.storage)
    finally:
        os.unlink(temp)
    target = task.target_bytes or options.max_shard_bytes
    if size > target * 1.1 and len(task.samples) > 1:
        logger.warning("%s is %.1f MiB, over the %.1f MiB target (re-encoded images compressed worse than "
                       "planned)", url, size / 2**20, target / 2**20)
    sidecar = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "shard": name, "index": task.index,
               "start": task.start, "items": len(task.samples), "first_key": task.samples[0].key,
               "final": task.final, "samples": samples, "bytes": size if samples else 0,
               "settings": task.settings, "inputs": task.inputs, "reencoded": dict(sorted(reencoded.items())),
               "bad": bad,
               "label_counts": {str(k): v for k, v in sorted(label_counts.items())}}
    if task.target_bytes is not None:
        sidecar["target_bytes"] = task.target_bytes
    write_bytes(join_url(task.out, sidecar_name(task.index)),
                json.dumps(sidecar, indent=None, sort_keys=True).encode("utf-8"), task.storage)
    return sidecar
