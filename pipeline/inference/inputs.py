"""Prediction inputs: a dataset prefix of shards, a folder of images, or a list of image URLs -> parts of (key, bytes).

The driver only plans (`plan_parts`): it reads a manifest, lists a folder or reads a URL list, and cuts the
input into numbered parts: one per shard, or `predict.rows_per_part` files in sorted order. Each part has a digest
of what it holds, so a re-run recognises a finished part even if the folder gained files meanwhile (then the
parts whose contents moved are predicted again). Reading the images (`read_part`, in Ray tasks) yields rows

    part, index (the row's position in its part), key, image (bytes or None), error (None or why the image could
    not be read), part_rows (-1)

then one trailer row per part (key None, part_rows = the number of image rows it had), so whoever collects the results
knows when a part is complete, and can put its rows back in input order (Ray Data does not keep it). Shards are parsed
by the loader's `pipeline.data.format.ShardSamples` straight from storage (never read whole into the driver); a corrupt
or truncated shard gives one error row naming it and how many samples it delivered. Files are read with a few threads
per part (object stores are latency-bound).
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pipeline.config import IMAGE_EXTENSIONS, StorageConfig
from pipeline.data.format import MANIFEST_FILE, SampleFormat, ShardSamples, image_member, read_manifest, tar_members
from pipeline.storage import StorageError, exists, filesystem, join_url, open_read, read_bytes

InputKind = Literal["shards", "folder", "urls"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # a folder's files Pillow reads
SHARD_IMAGES = SampleFormat(image=IMAGE_EXTENSIONS)  # a shard sample's image: the first of these members present
READ_THREADS = 16
ROWS_PER_TABLE = 256  # rows per table a reader yields (Ray Data splits its blocks along them)
Row = dict[str, Any]


def input_kind(url: str, storage: StorageConfig | None = None) -> InputKind:
    """shards (a prefix with manifest.json), folder (a directory) or urls (a file listing image URLs)."""
    if exists(join_url(url, MANIFEST_FILE), storage):
        return "shards"
    fs, path = filesystem(url, storage)
    try:
        if fs.isdir(path):
            return "folder"
        if fs.isfile(path):
            return "urls"
    except OSError as exc:
        raise StorageError(f"predict.input={url}: {type(exc).__name__}: {exc}") from exc
    raise ValueError(f"predict.input={url}: not found (expected a dataset prefix with {MANIFEST_FILE}, a folder of "
                     "images, or a .txt/.csv file of image URLs)")


def plan_parts(url: str, kind: InputKind, rows_per_part: int, storage: StorageConfig | None = None) -> list[Row]:
    """The input cut into parts: {"part", "shard" (URL or None), "paths" (file URLs), "rows" (expected images),
    "digest"}, numbered from 0 in a deterministic order."""
    if kind == "shards":
        manifest = read_manifest(url, storage)
        return [_part(i, shard=shard, rows=info.samples, identity=f"{shard}\t{info.samples}")
                for i, (shard, info) in enumerate(zip(manifest.shard_urls(url), manifest.shards, strict=True))]
    files = list_images(url, storage) if kind == "folder" else read_url_list(url, storage)
    chunks = [files[i:i + rows_per_part] for i in range(0, len(files), rows_per_part)]
    return [_part(i, paths=chunk, rows=len(chunk), identity="\n".join(chunk)) for i, chunk in enumerate(chunks)]


def _part(index: int, *, rows: int, identity: str, shard: str | None = None, paths: list[str] | None = None) -> Row:
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return {"part": index, "shard": shard, "paths": paths or [], "rows": rows, "digest": digest}


def list_images(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Every image file under the folder `url` (by suffix, recursively), sorted, spelled as `url` + relative path."""
    fs, root = filesystem(url, storage)
    root = root.rstrip("/")
    found = sorted(str(p) for p in fs.find(root) if str(p).lower().endswith(IMAGE_SUFFIXES))
    return [join_url(url, posixpath.relpath(p, root)) for p in found]


def read_url_list(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Image URLs from a text file (one per line; blank lines and # comments skipped) or a CSV file (its "url" or
    "path" column, else its first column), in file order."""
    text = read_bytes(url, storage).decode("utf-8")
    if not url.lower().endswith(".csv"):
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [name.strip().lower() for name in rows[0]]
    column = next((header.index(name) for name in ("url", "path") if name in header), None)
    body = rows[1:] if column is not None else rows
    return [row[column or 0].strip() for row in body if row and row[column or 0].strip()]


def read_part(part: Row, storage: StorageConfig | None = None) -> Iterator[list[Row]]:
    """A part's rows in lists of at most ROWS_PER_TABLE, its trailer row last."""
    rows = _shard_rows(part, storage) if part["shard"] else _file_rows(part, storage)
    chunk: list[Row] = []
    count = 0
    for row in rows:
        chunk.append({**row, "index": count})
        count += 1
        if len(chunk) == ROWS_PER_TABLE:
            yield chunk
            chunk = []
    chunk.append({"part": part["part"], "index": count, "key": None, "image": None, "error": None,
                  "part_rows": count})
    yield chunk


def _row(part: int, key: str, image: bytes | None = None, error: str | None = None) -> Row:
    return {"part": part, "key": key, "image": image, "error": error, "part_rows": -1}


def _shard_rows(planned: Row, storage: StorageConfig | None) -> Iterator[Row]:
    """A shard's samples; a shard that cannot be opened, breaks, or ends short of its manifest count adds one error
    row keyed by its URL (its missing samples have no keys to name)."""
    part, url = planned["part"], planned["shard"]
    try:
        stream = open_read(url, storage, reopen=True)
    except StorageError as exc:
        yield _row(part, url, error=f"unreadable shard: {exc}")
        return
    reading = ShardSamples(tar_members(stream, url), passthrough=())  # a shard that breaks is a row, never a crash
    try:
        for sample in reading:
            # `image_member` also finds "KEY.a.jpg"-style names: webdataset's key ends at the first dot of the basename.
            image = image_member(sample, SHARD_IMAGES)
            error = None if image is not None else f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) in {url}"
            yield _row(part, sample["__key__"], image, error)
    finally:
        stream.close()
    ending, delivered = reading.ending(planned["rows"]), reading.samples
    if ending == "corrupt":  # truncated or corrupt tar: the rest of the shard is lost, named once
        yield _row(part, url, error=f"corrupt shard after {delivered} samples: {type(reading.error).__name__}: "
                                    f"{reading.error}")
    elif ending == "truncated":
        yield _row(part, url, error=f"corrupt shard: it ended after {delivered} of {planned['rows']} samples")


def _read_one(url: str, storage: StorageConfig | None) -> tuple[bytes | None, str | None]:
    try:
        return read_bytes(url, storage), None
    except Exception as exc:  # missing, denied, or a filesystem's own error type: a row, never a crash
        return None, f"unreadable: {type(exc).__name__}: {exc}"


def _file_rows(part: Row, storage: StorageConfig | None) -> Iterator[Row]:
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for url, (image, error) in zip(part["paths"], pool.map(lambda u: _read_one(u, storage), part["paths"]),
                                       strict=True):
            yield _row(part["part"], url, image, error)
