"""Shard-size estimates: how many tar bytes a sample will take, before its image is prepared.

The writer plans shard boundaries from these estimates. They are exact for pass-through JPEGs (their bytes are
known); for re-encoded images they are the output pixel count times a bytes-per-pixel figure for the JPEG quality
(measured on photos), so shards stay at or under `shards.max_shard_mb` except where many re-encoded images
compress worse than photos. Only headers are read.
"""

from __future__ import annotations

import io
from concurrent.futures import Executor

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import ShardsConfig, StorageConfig
from pipeline.data.writing.build import Sample, sample_json
from pipeline.data.writing.images import open_image, reencode_reason, target_size
from pipeline.storage import open_read

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to a multiple of this
_TAR_END = 2 * _TAR_BLOCK  # end-of-archive marker
# JPEG bytes per output pixel by quality, measured on photos (skimage's astronaut, coffee, chelsea, motorcycle,
# hubble: q75 0.15-0.19, q90 0.26-0.32, q95 0.37-0.46), rounded up; used only to plan shard boundaries.
_BPP_QUALITY = (1, 50, 75, 85, 90, 95, 100)
_BPP_VALUE = (0.05, 0.14, 0.2, 0.26, 0.33, 0.47, 1.0)
_JPEG_OVERHEAD = 700  # headers and tables of a Pillow-written JPEG


def estimate_image_bytes(header: bytes | io.IOBase, size: int, options: ShardsConfig) -> int:
    """The stored JPEG's size, estimated from the input's header (`size`: the input's byte count)."""
    try:
        image = open_image(header) if isinstance(header, bytes) else Image.open(header)
    except Exception:
        return size  # unreadable: the writer reports it; its size does not matter
    if reencode_reason(image, options.max_image_side) is None:
        return size
    width, height = target_size(*image.size, options.max_image_side)
    bpp = float(np.interp(options.jpeg_quality, _BPP_QUALITY, _BPP_VALUE))
    return int(width * height * bpp) + _JPEG_OVERHEAD


def _pad(n: int) -> int:
    return -(-n // _TAR_BLOCK) * _TAR_BLOCK


def record_bytes(image_bytes: int, json_bytes: int) -> int:
    """Bytes one sample occupies in the tar: two member headers plus block-padded contents."""
    return 2 * _TAR_BLOCK + _pad(image_bytes) + _pad(json_bytes)


def tar_bytes(records: int) -> int:
    """The size of a tar holding samples of `records` bytes in all: the end marker, padded to whole records."""
    return -(-(records + _TAR_END) // _TAR_RECORD) * _TAR_RECORD


def estimate_record(sample: Sample, options: ShardsConfig, storage: StorageConfig | None) -> int:
    """`record_bytes` of `sample`, its image size estimated (a path sample's header is read from storage)."""
    json_bytes = len(sample_json(sample))
    if sample.image is not None:
        return record_bytes(estimate_image_bytes(sample.image, len(sample.image), options), json_bytes)
    assert sample.path is not None
    try:
        with open_read(sample.path, storage) as handle:
            size = handle.seek(0, io.SEEK_END)
            handle.seek(0)
            image_bytes = estimate_image_bytes(handle, size, options)  # reads only the header
    except Exception:  # missing or unreadable: reported (or raised) by the writer
        image_bytes = 0
    return record_bytes(image_bytes, json_bytes)


def estimate_chunk(args: tuple[list[Sample], ShardsConfig, StorageConfig | None]) -> list[int]:
    """`estimate_record` of each sample: one task of the writer's parallel sizing pass."""
    samples, options, storage = args
    return [estimate_record(s, options, storage) for s in samples]


def estimate_records(items: list[tuple[int, Sample]], options: ShardsConfig, storage: StorageConfig | None,
                     pool: Executor | None) -> dict[int, int]:
    """{position: `estimate_record`} of (position, sample) items: path samples in chunks on `pool` (reads headers
    only; with a progress bar), in-memory ones here."""
    todo = [(p, s) for p, s in items if s.path is not None]
    chunks = [todo[i:i + 256] for i in range(0, len(todo), 256)]
    args = [([s for _, s in chunk], options, storage) for chunk in chunks]
    mapped = pool.map(estimate_chunk, args) if pool is not None else map(estimate_chunk, args)
    estimates = {p: estimate_record(s, options, storage) for p, s in items if s.path is None}
    with tqdm(total=len(todo), desc="sizing", unit="img", disable=not options.progress or not todo) as bar:
        for chunk, sizes in zip(chunks, mapped, strict=True):
            estimates.update((p, size) for (p, _), size in zip(chunk, sizes, strict=True))
            bar.update(len(chunk))
    return estimates


def planned_shard_bytes(total_record_bytes: int, options: ShardsConfig) -> int:
    """The shard size to plan for a dataset whose samples take `total_record_bytes` in tars: `max_shard_bytes`,
    lowered so that the dataset makes at least `min_shards` shards, but not below `min_shard_bytes`."""
    if options.min_shards is None or options.samples_per_shard:
        return options.max_shard_bytes
    per_shard = -(-total_record_bytes // options.min_shards)
    return min(options.max_shard_bytes, max(options.min_shard_bytes, per_shard))
