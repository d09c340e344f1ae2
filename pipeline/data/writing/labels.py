"""Labels files (CSV or JSON Lines): each image's class names, the class list they imply, the folder's Samples.

A labels file lists each image once, by a path relative to the images folder (or absolute), with its class names
(`read_labels_file` has the formats). Without a training set's classes.tsv the class ids come from the file
(`build_vocabulary`: by frequency, so id 0 is the most common class).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import StorageConfig
from pipeline.data.format import ClassInfo
from pipeline.data.writing.build import MAX_KEY_LEN, Sample
from pipeline.storage import join_url, read_bytes


class LabelsFileError(ValueError):
    """A labels file or vocabulary that cannot be used; the message names the file and line."""


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


def _path_key(path: str) -> str:
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem.split("://", 1)[-1]).strip("_-") or "image"
    if len(key) > MAX_KEY_LEN - 10:
        key = f"{key[:MAX_KEY_LEN - 28]}_{hashlib.sha1(key.encode()).hexdigest()[:16]}"
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

