"""Shard writing: images + labels -> WebDataset tars of a target size, a manifest and a classes file.

Output (format: `pipeline.data.manifest`): under the dataset prefix `OUT/`

- `shard-000000.tar`, ...: per sample `KEY.jpg` (an RGB JPEG) and `KEY.json` (`{"labels": [class ids], ...meta}`),
  written with `webdataset.TarWriter` (members sorted, mtime 0, so the same input gives byte-identical tars);
- `shard-000000.json`, ...: a sidecar per shard (input range, sample count, bytes, bad inputs, label counts), written
  after its tar; a shard is *published* when both exist and agree;
- `classes.tsv`, then `manifest.json` last, built from the sidecars. Readers that see a manifest see complete shards.

Images (`prepare_image`): every input is decoded with Pillow to prove it is readable. A baseline/progressive JPEG that
is already RGB, upright (EXIF orientation 1) and at most `max_image_side` on its longer side is stored byte-identical;
anything else (PNG/GIF/TIFF/..., grayscale, CMYK, alpha, rotated, larger) is converted to RGB (alpha over white),
turned upright, downscaled to `max_image_side` (Lanczos, after JPEG DCT scaling) and re-encoded at `jpeg_quality`.
Undecodable or truncated inputs are skipped and reported with their path/key; they never stop the run.

Default `max_image_side` = 512: training crops are resized to 299 (paper), so a longer side of 512 still keeps the
shorter side >= 299 for aspect ratios up to 1.7:1, while decoding stays cheap (measured on a 2-core machine:
~600 decodes+crops/s per core at 500x375 versus ~100/s at 1024x768) and shards stay ~3-4x smaller than at full
resolution.

Shard boundaries are planned in input order, greedily, by each sample's *estimated* tar record size: exact for
pass-through JPEGs (their bytes are known), and for re-encoded images the output pixel count times a bytes-per-pixel
figure for the JPEG quality (measured on photos); so shards stay at or under `max_shard_bytes` except where many
re-encoded images compress worse than photos. `samples_per_shard` plans by count instead (no size pass).
The plan depends only on the input and the settings, which makes output deterministic and runs resumable: a re-run
skips every published shard (checking that its sidecar matches the plan) and writes only the missing ones.
Worker processes each build whole shards: read, validate/re-encode, write a local temp tar, publish it atomically
with `upload_file`, then the sidecar. A crashed writer leaves no partial shard visible.

Sources: `write_folder_shards` (a folder of images + a CSV/JSONL labels file, see `read_labels_file`),
`write_demo_shards` (the generated demo dataset), or `ShardWriter.write` with any iterable of `Sample`s.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.config import StorageConfig
from pipeline.data.manifest import (
    ClassInfo,
    Manifest,
    ShardInfo,
    classes_from_tsv,
    write_classes,
    write_manifest,
)
from pipeline.storage import StorageError, filesystem, join_url, open_read, read_bytes, upload_file, with_retries
from pipeline.storage import write_bytes as storage_write_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
DEFAULT_MAX_IMAGE_SIDE = 512
DEFAULT_JPEG_QUALITY = 90
SIDECAR_FORMAT = "xception-pipeline-shard-sidecar"
SIDECAR_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.(tar|json)$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no dots: webdataset splits KEY.ext at the first dot
_MAX_KEY_LEN = 90  # tar (ustar) member names are limited to 100 bytes: KEY + ".json"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to a multiple of this
_TAR_END = 2 * _TAR_BLOCK  # end-of-archive marker
# JPEG bytes per output pixel by quality, measured on photos (skimage's astronaut, coffee, chelsea, motorcycle,
# hubble: q75 0.15-0.19, q90 0.26-0.32, q95 0.37-0.46), rounded up; used only to plan shard boundaries.
_BPP_QUALITY = (1, 50, 75, 85, 90, 95, 100)
_BPP_VALUE = (0.05, 0.14, 0.2, 0.26, 0.33, 0.47, 1.0)
_JPEG_OVERHEAD = 700  # headers and tables of a Pillow-written JPEG
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImageError(ValueError):
    """An input that is not a usable image (undecodable, truncated, empty); the message says why."""


class LabelsFileError(ValueError):
    """A labels file or vocabulary that cannot be used; the message names the file and line."""


class ShardWriteError(RuntimeError):
    """Shards could not be written, or the prefix holds shards from another input/settings; names the URL."""


# ----------------------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class ShardOptions:
    """How shards are cut and images normalised. Sizes in bytes ("MB" in the CLI means 2**20 bytes)."""

    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    max_shard_samples: int | None = None  # also close a shard at this many input items
    samples_per_shard: int | None = None  # plan by count only (no size estimates); overrides the size target
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE  # longer side; larger images are downscaled
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # for re-encoded images only
    workers: int | None = None  # writer processes; None = all cores, <= 1 = in this process
    progress: bool = True  # tqdm bar on stderr
    tmp_dir: str | None = None  # local directory for shards being built (default: the system temp dir)

    def __post_init__(self) -> None:
        if self.max_shard_bytes < 64 * 1024:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes} is too small (at least 64 KiB)")
        for name in ("max_shard_samples", "samples_per_shard"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (or None)")
        if self.max_image_side < 16:
            raise ValueError(f"max_image_side={self.max_image_side} must be >= 16")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in 1..100")

    @property
    def num_workers(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)

    def output_settings(self) -> dict[str, Any]:
        """The settings that determine the bytes written (recorded in sidecars and the manifest)."""
        return {"max_shard_bytes": self.max_shard_bytes, "max_shard_samples": self.max_shard_samples,
                "samples_per_shard": self.samples_per_shard, "max_image_side": self.max_image_side,
                "jpeg_quality": self.jpeg_quality}


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


@dataclass(frozen=True)
class BadSample:
    key: str
    source: str  # the input path/URL, or the key for in-memory images
    reason: str
    shard: str = ""


@dataclass
class ShardReport:
    """What a `write` did. `samples` and `bad` cover the whole dataset; the rest this run."""

    out: str
    shards: list[ShardInfo]
    samples: int
    bad: list[BadSample]
    reencoded: dict[str, int]  # reason -> count, whole dataset
    written_shards: list[int]  # indices written by this run
    skipped_shards: list[int]  # indices already published (resumed)
    processed_items: int  # input items read by this run
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.processed_items / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        total_bytes = sum(s.bytes for s in self.shards)
        lines = [
            f"{self.out}: {len(self.shards)} shards, {self.samples} samples, {total_bytes / 2**20:.1f} MiB",
            f"this run: {len(self.written_shards)} shards written, {len(self.skipped_shards)} already published, "
            f"{self.processed_items} inputs in {self.seconds:.1f} s ({self.samples_per_second:.1f} samples/s)",
        ]
        if self.reencoded:
            lines.append("re-encoded: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.reencoded.items())))
        lines.append(f"bad inputs skipped: {len(self.bad)}")
        lines += [f"  {b.source}: {b.reason}" for b in self.bad[:50]]
        if len(self.bad) > 50:
            lines.append(f"  ... and {len(self.bad) - 50} more (listed in the shard sidecars shard-*.json)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    reencoded: str | None  # None when the input bytes are stored as they are, else why it was re-encoded


def _describe(exc: BaseException) -> str:
    """`Type: message` without object addresses, so reports (and sidecars) are the same on every run."""
    return f"{type(exc).__name__}: " + re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(exc))


def _open_image(data: bytes) -> Image.Image:
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"too many pixels: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError and the plugins' assorted header errors
        raise BadImageError(f"not a readable image ({_describe(exc)})") from exc


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in _TRANSPOSE else 1
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1


def _reencode_reason(image: Image.Image, max_side: int) -> str | None:
    """Why `image` (opened, not decoded) cannot be stored as it is; None if its bytes can."""
    if image.format != "JPEG":
        return f"format {image.format or 'unknown'}"
    if image.mode != "RGB":
        return f"mode {image.mode}"
    if max(image.size) > max_side:
        return "downscaled"
    if _orientation(image) != 1:
        return "exif orientation"
    return None


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = image.convert("F")
        high = image.getextrema()[1]
        if isinstance(high, (int, float)) and high > 255:  # 16-bit data: map 0..65535 to 0..255
            image = image.point(lambda v: v / 257.0)
        image = image.convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare_image(data: bytes, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                  jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> PreparedImage:
    """Validate one encoded image and return the RGB JPEG to store (see the module docstring for the rules).

    Raises `BadImageError` (with the reason) for anything Pillow cannot fully decode.
    """
    image = _open_image(data)
    reason = _reencode_reason(image, max_image_side)
    width, height = image.size
    target = _target_size(width, height, max_image_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if reason is not None and image.format == "JPEG" and target != (width, height):
                image.draft(None, target)  # DCT-domain downscale by 1/2, 1/4, 1/8 (never below the target)
            image.load()  # full decode: truncated or corrupt data raises here
            if reason is None:
                return PreparedImage(jpeg=data, width=width, height=height, reencoded=None)
            orientation = _orientation(image)
            image = _to_rgb(image)
            if image.size != target:
                image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            if orientation != 1:
                image = image.transpose(_TRANSPOSE[orientation])
    except BadImageError:
        raise
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, zlib errors, ...
        raise BadImageError(f"corrupt or truncated image data ({_describe(exc)})") from exc
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    return PreparedImage(jpeg=out.getvalue(), width=image.width, height=image.height, reencoded=reason)


def _estimate_image_bytes(header: bytes | io.IOBase, size: int, options: ShardOptions) -> int:
    """Planning estimate of the stored JPEG's size: exact for pass-through images (see module docstring)."""
    try:
        image = _open_image(header) if isinstance(header, bytes) else Image.open(header)
    except Exception:
        return size  # unreadable: the writer reports it; its size does not matter
    if _reencode_reason(image, options.max_image_side) is None:
        return size
    width, height = _target_size(*image.size, options.max_image_side)
    bpp = float(np.interp(options.jpeg_quality, _BPP_QUALITY, _BPP_VALUE))
    return int(width * height * bpp) + _JPEG_OVERHEAD


def _pad(n: int) -> int:
    return -(-n // _TAR_BLOCK) * _TAR_BLOCK


def _record_bytes(image_bytes: int, json_bytes: int) -> int:
    """Bytes one sample occupies in the tar: two member headers plus block-padded contents."""
    return 2 * _TAR_BLOCK + _pad(image_bytes) + _pad(json_bytes)


def _tar_bytes(records: int) -> int:
    return -(-(records + _TAR_END) // _TAR_RECORD) * _TAR_RECORD


def _sample_json(sample: Sample) -> bytes:
    body = {**sample.meta, "labels": list(sample.labels)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _estimate_record(sample: Sample, options: ShardOptions, storage: StorageConfig | None) -> int:
    json_bytes = len(_sample_json(sample))
    if sample.image is not None:
        return _record_bytes(_estimate_image_bytes(sample.image, len(sample.image), options), json_bytes)
    assert sample.path is not None
    try:
        with open_read(sample.path, storage) as handle:
            size = handle.seek(0, io.SEEK_END)
            handle.seek(0)
            image_bytes = _estimate_image_bytes(handle, size, options)  # reads only the header
    except Exception:  # missing or unreadable: reported (or raised) by the writer
        image_bytes = 0
    return _record_bytes(image_bytes, json_bytes)


def _estimate_chunk(args: tuple[list[Sample], ShardOptions, StorageConfig | None]) -> list[int]:
    samples, options, storage = args
    return [_estimate_record(s, options, storage) for s in samples]


# ----------------------------------------------------------------------------------------------- labels files


@dataclass(frozen=True)
class LabeledImage:
    """One row of a labels file: an image path (relative to the images folder, or absolute), its class names."""

    path: str
    labels: list[str]
    meta: dict[str, Any]
    line: int


def _split_labels(text: str) -> list[str]:
    names = [n.strip() for n in re.split(r"[|;]", text)]
    return list(dict.fromkeys(n for n in names if n))


def _read_csv(text: str, source: str) -> list[LabeledImage]:
    reader = csv.reader(io.StringIO(text))
    records: list[LabeledImage] = []
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None and not records and row[0].strip().lower() == "path":
            header = [cell.strip().lower() for cell in row]
            if "labels" not in header:
                raise LabelsFileError(f"{source}:{line}: the header needs a 'labels' column, got {row!r}")
            continue
        if header is not None:
            if len(row) != len(header):
                raise LabelsFileError(f"{source}:{line}: {len(row)} columns but the header has {len(header)}")
            cells = dict(zip(header, row, strict=True))
            path, labels = cells.pop("path").strip(), cells.pop("labels")
            meta: dict[str, Any] = cells
        else:
            if len(row) > 2:
                raise LabelsFileError(f"{source}:{line}: expected 'path,labels' (2 columns), got {len(row)}; "
                                      "separate labels with '|' or ';' and quote fields that contain commas")
            path, labels, meta = row[0].strip(), (row[1] if len(row) > 1 else ""), {}
        if not path:
            raise LabelsFileError(f"{source}:{line}: empty image path")
        records.append(LabeledImage(path=path, labels=_split_labels(labels), meta=meta, line=line))
    return records


def _read_jsonl(text: str, source: str) -> list[LabeledImage]:
    records = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LabelsFileError(f"{source}:{line}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise LabelsFileError(f"{source}:{line}: expected an object {{\"path\": ..., \"labels\": [...]}}")
        path, labels = row.pop("path", None), row.pop("labels", None)
        if not isinstance(path, str) or not path.strip():
            raise LabelsFileError(f"{source}:{line}: 'path' must be a non-empty string, got {path!r}")
        if not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
            raise LabelsFileError(f"{source}:{line}: 'labels' must be a list of class names (strings), got {labels!r}")
        names = list(dict.fromkeys(n.strip() for n in labels if n.strip()))
        records.append(LabeledImage(path=path.strip(), labels=names, meta=row, line=line))
    return records


def read_labels_file(url: str, storage: StorageConfig | None = None) -> list[LabeledImage]:
    """Parse a labels file (local path or URL), chosen by extension.

    - `.csv`: `path,labels` per row, class names separated by `|` or `;` (an empty field = no labels). An optional
      header row starting with `path` names the columns; it must have `labels`, and any other columns are kept as
      per-sample metadata. Standard CSV quoting applies.
    - `.jsonl` / `.json` (JSON Lines): `{"path": "a/b.jpg", "labels": ["cat", "dog"], ...}` per line; other keys
      are kept as metadata.

    Paths are relative to the images folder (or absolute). Each path may appear once.
    """
    text = read_bytes(url, storage).decode("utf-8-sig")
    lower = url.lower()
    if lower.endswith(".csv"):
        records = _read_csv(text, url)
    elif lower.endswith((".jsonl", ".json")):
        records = _read_jsonl(text, url)
    else:
        raise LabelsFileError(f"{url}: unknown labels file type; use .csv (path,labels) or .jsonl")
    seen: dict[str, int] = {}
    for rec in records:
        if rec.path in seen:
            raise LabelsFileError(f"{url}:{rec.line}: image {rec.path!r} is listed again (first on line "
                                  f"{seen[rec.path]}); give each image one row with all its labels")
        seen[rec.path] = rec.line
    if not records:
        raise LabelsFileError(f"{url}: no images listed")
    return records


def build_vocabulary(records: Iterable[LabeledImage]) -> list[ClassInfo]:
    """Class ids from a labels file: by frequency (descending), ties by name, so id 0 is the most frequent class.

    `train_frequency` here is the count in the labels file; the written classes.tsv counts written samples.
    """
    counts = Counter(name for rec in records for name in rec.labels)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [ClassInfo(id=i, name=name, train_frequency=n) for i, (name, n) in enumerate(ordered)]


def read_vocabulary(url: str, storage: StorageConfig | None = None) -> list[ClassInfo]:
    """A classes.tsv (local path or URL) as written next to a training set: the ids an eval set must reuse."""
    return classes_from_tsv(read_bytes(url, storage).decode("utf-8"), source=url)


def _path_key(path: str) -> str:
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem.split("://", 1)[-1]).strip("_-") or "image"
    if len(key) > _MAX_KEY_LEN - 10:
        key = f"{key[:_MAX_KEY_LEN - 28]}_{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    return key


def folder_samples(images: str, records: Sequence[LabeledImage], classes: Sequence[ClassInfo],
                   source: str = "labels file") -> list[Sample]:
    """`Sample`s (read lazily by path) for `records`, with class names mapped to the ids of `classes`.

    Raises `LabelsFileError` naming `source` and the line of each unknown class name. Keys are the sanitised
    relative paths (unique; a numeric suffix resolves clashes) and KEY.json records the original path.
    """
    ids = {c.name: c.id for c in classes}
    unknown = [(rec.line, name) for rec in records for name in rec.labels if name not in ids]
    if unknown:
        shown = "; ".join(f"line {line}: {name!r}" for line, name in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise LabelsFileError(f"{source}:{unknown[0][0]}: unknown class {unknown[0][1]!r}, not in the given "
                              f"vocabulary of {len(classes)} classes; unknown names: {shown}{more}")
    samples, used = [], set()
    for rec in records:
        key = base = _path_key(rec.path)
        n = 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        url = rec.path if "://" in rec.path or rec.path.startswith("/") else join_url(images, rec.path)
        samples.append(Sample(key=key, labels=sorted({ids[name] for name in rec.labels}), path=url,
                              meta={**rec.meta, "path": rec.path}))
    return samples


# ---------------------------------------------------------------------------------------------------- writing


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _sidecar_name(index: int) -> str:
    return f"shard-{index:06d}.json"


@dataclass
class _Task:
    index: int
    start: int
    samples: list[Sample]
    final: bool
    out: str
    settings: str
    options: ShardOptions
    storage: StorageConfig | None


_tick: Callable[[int], None] = lambda n: None  # noqa: E731  (set per process: progress of samples processed)


def _set_tick(fn: Callable[[int], None]) -> None:
    global _tick
    _tick = fn


def _init_pool(counter: Any) -> None:
    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _set_tick(tick)


def _process_context() -> multiprocessing.context.BaseContext:
    """Worker processes start from a clean server that imported this module once ("forkserver"): safe with the
    threads of s3fs/tqdm in this process, and without every worker paying the imports (webdataset pulls in torch:
    seconds per process on a busy 2-core machine). "spawn" where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "s3fs"])  # a missing preload module is skipped
    return ctx


def _read_input(sample: Sample, storage: StorageConfig | None) -> bytes:
    if sample.image is not None:
        return sample.image
    assert sample.path is not None
    return read_bytes(sample.path, storage)


def _write_shard(task: _Task) -> dict[str, Any]:
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
                tar.write({"__key__": sample.key, "jpg": prepared.jpeg, "json": _sample_json(sample)})
                samples += 1
                label_counts.update(sample.labels)
                if prepared.reencoded:
                    reencoded[prepared.reencoded.split(" ")[0]] += 1
        size = os.path.getsize(temp)
        if samples:
            upload_file(temp, url, task.storage)
    finally:
        os.unlink(temp)
    if size > options.max_shard_bytes * 1.1 and len(task.samples) > 1:
        logger.warning("%s is %.1f MiB, over the %.1f MiB target (re-encoded images compressed worse than "
                       "planned)", url, size / 2**20, options.max_shard_bytes / 2**20)
    sidecar = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "shard": name, "index": task.index,
               "start": task.start, "items": len(task.samples), "first_key": task.samples[0].key,
               "final": task.final, "samples": samples, "bytes": size if samples else 0,
               "settings": task.settings, "reencoded": dict(sorted(reencoded.items())), "bad": bad,
               "label_counts": {str(k): v for k, v in sorted(label_counts.items())}}
    storage_write_bytes(join_url(task.out, _sidecar_name(task.index)),
                        json.dumps(sidecar, indent=None, sort_keys=True).encode("utf-8"), task.storage)
    return sidecar


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


SampleSource = Iterable[Sample | tuple[str, bytes, Sequence[int]]] | Callable[[int], Iterable[Sample]]


class ShardWriter:
    """Writes a dataset prefix `out` from samples labelled with the ids of `classes` (see the module docstring).

    `count_frequencies=True` (a training split) writes classes.tsv with train_frequency = the number of written
    samples carrying each class; `False` (an eval split given the training vocabulary) copies `classes` as they are,
    frequencies and weights included, so both splits share ids and weights.
    """

    def __init__(self, out: str, classes: Sequence[ClassInfo], *, count_frequencies: bool = True,
                 labels: Literal["sparse", "dense"] = "sparse", attribution: str = "",
                 extra: dict[str, Any] | None = None, options: ShardOptions | None = None,
                 storage: StorageConfig | None = None) -> None:
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
        self.options = options or ShardOptions()
        self.storage = storage
        fingerprint = json.dumps({"writer": self.options.output_settings(), "version": SIDECAR_VERSION,
                                  "classes": [c.name for c in self.classes]}, sort_keys=True)
        self.settings = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]

    # -- published state ---------------------------------------------------------------------------------------

    def _published(self) -> tuple[dict[int, dict[str, Any]], list[str]]:
        """Sidecars of shards that are complete (sidecar + tar of the recorded size), and stale names."""
        fs, path = filesystem(self.out, self.storage)

        def listing() -> dict[str, int]:
            try:
                entries = fs.ls(path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return {}
            return {os.path.basename(str(e["name"]).rstrip("/")): int(e.get("size") or 0) for e in entries}

        sizes = with_retries(listing, what=f"list {self.out}", storage=self.storage)
        indices = sorted({int(m.group(1)) for n in sizes if (m := _SHARD_RE.match(n)) and m.group(2) == "json"})
        with cf.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda i: read_bytes(join_url(self.out, _sidecar_name(i)), self.storage), indices))
        published: dict[int, dict[str, Any]] = {}
        for index, text in zip(indices, texts, strict=True):
            url = join_url(self.out, _sidecar_name(index))
            try:
                side = json.loads(text)
                ok = side.get("format") == SIDECAR_FORMAT and side.get("index") == index
            except (json.JSONDecodeError, AttributeError):
                ok = False
            if not ok:
                logger.warning("%s is not a shard sidecar of this writer; its shard will be rewritten", url)
                continue
            if side.get("version") != SIDECAR_VERSION or side.get("settings") != self.settings:
                raise ShardWriteError(
                    f"{url}: this shard was written with other settings or another class vocabulary "
                    f"(sidecar settings {side.get('settings')!r}, this run {self.settings!r}; this run: "
                    f"{self.options.output_settings()}); write to a new prefix or delete the old shards")
            if side["samples"] == 0 or sizes.get(shard_name(index)) == side["bytes"]:
                published[index] = side
        return published, sorted(sizes)

    # -- planning ------------------------------------------------------------------------------------------------

    def _check(self, sample: Sample, seen: set[str]) -> Sample:
        if not isinstance(sample, Sample):
            key, image, labels = sample  # (key, image bytes, label ids)
            sample = Sample(key=key, labels=labels, image=image)
        if not _KEY_RE.match(sample.key) or len(sample.key) > _MAX_KEY_LEN:
            raise ValueError(f"sample key {sample.key!r} is not tar-safe: use letters, digits, '_' and '-' "
                             f"(no dots), at most {_MAX_KEY_LEN} characters")
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
              estimate: Callable[[int, Sample], int]) -> Iterator[_Task]:
        """Greedy, in input order: close a shard when the next sample would push its estimated size over the
        target (or at the sample cap). Published shards on the way are skipped after checking they match."""
        options = self.options
        cap = options.samples_per_shard or options.max_shard_samples
        index, position = start_shard, start_item
        while True:
            previous = published.get(index - 1)
            if previous is not None and previous["final"] and (item := items.next()) is not None:
                raise ShardWriteError(
                    f"{join_url(self.out, _sidecar_name(index - 1))}: the input has more items (next: "
                    f"{item[1].key!r}) than when this last shard was written; write to a new prefix")
            side = published.get(index)
            if side is not None:
                url = join_url(self.out, _sidecar_name(index))
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
                position += side["items"]
                index += 1
                continue
            group: list[Sample] = []
            records = 0
            final = False
            while True:
                item = items.next()
                if item is None:
                    final = True
                    break
                record = 0 if options.samples_per_shard else estimate(*item)
                if group and ((cap and len(group) >= cap)
                              or _tar_bytes(records + record) > options.max_shard_bytes):
                    items.push(item)
                    break
                group.append(item[1])
                records += record
            if not group:
                return
            yield _Task(index=index, start=position, samples=group, final=final, out=self.out,
                        settings=self.settings, options=options, storage=self.storage)
            position += len(group)
            index += 1

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
        published, names = self._published()
        # The contiguous run of published shards from shard 0 can be skipped without reading their inputs.
        first, skip_to = 0, 0
        while first in published and published[first]["start"] == skip_to:
            skip_to += published[first]["items"]
            first += 1
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

        workers = options.num_workers
        pool, counter = None, None
        if workers > 1:
            ctx = _process_context()
            counter = ctx.Value("q", 0)  # samples processed, summed over workers (progress bar)
            pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool, initargs=(counter,))
        results: dict[int, dict[str, Any]] = {}
        try:
            estimates: dict[int, int] = {}
            if sequence and not options.samples_per_shard:
                checked_list = list(checked)
                checked = iter(checked_list)
                estimates = self._estimate_all(checked_list, published, pool)

            def estimate(position: int, sample: Sample) -> int:
                value = estimates.pop(position, None)
                return value if value is not None else _estimate_record(sample, options, self.storage)

            plan = self._plan(_Pushback(checked), first, skip_to, published, estimate)
            remaining = None if total is None else max(0, total - sum(s["items"] for s in published.values()))
            bar = tqdm(total=remaining, desc=f"shards -> {self.out}", unit="img", disable=not options.progress,
                       smoothing=0.1, dynamic_ncols=True)
            with bar:
                if pool is None:
                    _set_tick(bar.update)
                    try:
                        for task in plan:
                            results[task.index] = self._run(lambda t=task: _write_shard(t), task)
                    finally:
                        _set_tick(lambda n: None)
                else:
                    self._run_pool(pool, plan, results, bar, counter, workers)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self._finish(published, results, names, began)

    def _run(self, fn: Callable[[], dict[str, Any]], task: _Task) -> dict[str, Any]:
        try:
            return fn()
        except (StorageError, OSError, ValueError) as exc:
            raise ShardWriteError(f"writing {join_url(self.out, shard_name(task.index))} failed: {exc}") from exc

    def _run_pool(self, pool: cf.ProcessPoolExecutor, plan: Iterator[_Task], results: dict[int, dict[str, Any]],
                  bar: tqdm, counter: Any, workers: int) -> None:
        running: dict[cf.Future[dict[str, Any]], _Task] = {}

        def collect(block_until: int) -> None:
            while len(running) > block_until:
                done, _ = cf.wait(running, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                bar.update(counter.value - bar.n)
                for future in done:
                    task = running.pop(future)
                    results[task.index] = self._run(future.result, task)

        for task in plan:
            collect(workers)  # bounded: at most workers+1 shards' samples in flight
            running[pool.submit(_write_shard, task)] = task
        collect(0)
        bar.update(counter.value - bar.n)

    def _estimate_all(self, items: list[tuple[int, Sample]], published: dict[int, dict[str, Any]],
                      pool: cf.ProcessPoolExecutor | None) -> dict[int, int]:
        """Size estimates of path samples outside published shards, computed in parallel (reads headers only)."""
        covered = bytearray((items[-1][0] + 1) if items else 0)
        for side in published.values():
            stop = min(side["start"] + side["items"], len(covered))
            covered[side["start"]:stop] = b"\x01" * max(0, stop - side["start"])
        todo = [(p, s) for p, s in items if s.path is not None and not covered[p]]
        chunks = [todo[i:i + 256] for i in range(0, len(todo), 256)]
        args = [([s for _, s in chunk], self.options, self.storage) for chunk in chunks]
        mapped = pool.map(_estimate_chunk, args) if pool is not None else map(_estimate_chunk, args)
        estimates: dict[int, int] = {}
        bar = tqdm(total=len(todo), desc="sizing", unit="img", disable=not self.options.progress or not todo)
        with bar:
            for chunk, sizes in zip(chunks, mapped, strict=True):
                estimates.update((p, size) for (p, _), size in zip(chunk, sizes, strict=True))
                bar.update(len(chunk))
        return estimates

    def _finish(self, published: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]], names: list[str],
                began: float) -> ShardReport:
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
        stale = [n for n in names if (m := _SHARD_RE.match(n)) and int(m.group(1)) >= count]
        if stale:
            logger.warning("%s holds shard files beyond this dataset's %d shards (not in the manifest): %s",
                           self.out, count, ", ".join(stale[:6]))
        shards = [ShardInfo(url=s["shard"], samples=s["samples"], bytes=s["bytes"]) for s in chain if s["samples"]]
        bad = [BadSample(shard=s["shard"], **b) for s in chain for b in s["bad"]]
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
        extra = {**self.extra, "writer": {**self.options.output_settings(), "settings_id": self.settings},
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


# --------------------------------------------------------------------------------------------------- sources


def write_folder_shards(images: str, labels_file: str, out: str, *, vocabulary: Sequence[ClassInfo] | None = None,
                        labels: Literal["sparse", "dense"] = "sparse", attribution: str = "",
                        options: ShardOptions | None = None, storage: StorageConfig | None = None) -> ShardReport:
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
                         options=options, storage=storage)
    return writer.write(samples)


def write_demo_shards(variant: Literal["openmoji", "tiny"], split: Literal["train", "eval"], count: int, seed: int,
                      out: str, *, vocabulary: Sequence[ClassInfo] | None = None, image_size: int | None = None,
                      options: ShardOptions | None = None, storage: StorageConfig | None = None,
                      **demo_options: Any) -> ShardReport:
    """Shards of the built-in demo dataset (`pipeline.data.demo`): sparse labels for "train", dense for "eval".

    Samples are generated by `options.workers` processes and written in this process (checking a generated JPEG
    is cheap next to drawing it). `vocabulary` (the train split's classes.tsv) makes an eval split copy its
    frequencies; without it classes.tsv counts this split's labels. `demo_options` go to `open_demo` (for
    example `eval_artist`, `catalog_size`).
    """
    from pipeline.data.demo import open_demo

    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    options = options or ShardOptions()
    dataset = open_demo(variant, **({"image_size": image_size} if image_size else {}), **demo_options)
    classes = [ClassInfo(id=c.id, name=c.name) for c in dataset.classes]
    if vocabulary is not None:
        if [c.name for c in vocabulary] != [c.name for c in classes]:
            raise LabelsFileError(f"the given vocabulary ({len(vocabulary)} classes) is not the {variant} demo's "
                                  f"({len(classes)} classes, same names in the same order required)")
        classes = list(vocabulary)
    generators = options.num_workers

    def generate(start: int) -> Iterator[Sample]:
        for s in dataset.generate(split, count - start, seed, start=start, workers=generators, progress=False):
            yield Sample(key=s.key, labels=s.labels, image=s.jpeg, meta=s.meta)

    writer = ShardWriter(out, classes, count_frequencies=vocabulary is None,
                         labels="sparse" if split == "train" else "dense", attribution=dataset.attribution,
                         extra={"demo": {**dataset.describe(), "split": split, "count": count, "seed": seed}},
                         options=dataclasses.replace(options, workers=1), storage=storage)
    return writer.write(generate, total=count)
