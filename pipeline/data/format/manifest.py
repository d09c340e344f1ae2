"""The dataset manifest and classes file: what a dataset prefix holds, versioned.

A dataset prefix (`s3://bucket/jft/train/`) holds `manifest.json` and `classes.tsv` beside its shards:

manifest.json (format version 1)::

    {"format": "xception-pipeline-shards", "version": 1, "num_classes": 600, "num_samples": 12345,
     "classes": "classes.tsv", "shards": [{"url": "shard-000000.tar", "samples": 1000, "bytes": 26214400}, ...],
     "labels": "sparse" | "dense", "attribution": "...", "extra": {...}}

Version 2 adds `"sample_format"`: where each sample keeps its image and labels, for shards written by other tools
(`pipeline.data.format.sample_format`; written by `pipeline.data.adopt`). A manifest without it is written as version 1
(the project's own `KEY.jpg` + `KEY.json` samples), so readers of version 1 keep reading the project's shards and
refuse, by version, the shards they could not read.

Shard URLs are relative to the prefix (absolute URLs are allowed too: a manifest indexing read-only shards elsewhere).
classes.tsv has a header
`id<TAB>name<TAB>train_frequency<TAB>weight` (weight may be empty) and one row per class id 0..num_classes-1.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import StorageConfig
from pipeline.data.format.sample_format import OWN_FORMAT, SampleFormat
from pipeline.storage import join_url, read_bytes, write_bytes

FORMAT_NAME = "xception-pipeline-shards"
FORMAT_VERSION = 2  # the newest this reader knows; 1 is still written when it suffices
SUPPORTED_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
CLASSES_FILE = "classes.tsv"


class ManifestError(ValueError):
    """A manifest or classes file that cannot be used; the message names the URL and the field."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # relative to the dataset prefix, or absolute
    samples: int
    bytes: int = 0


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    train_frequency: int = 0
    weight: float | None = None


@dataclass
class Manifest:
    num_classes: int
    shards: list[ShardInfo]
    labels: str = "sparse"  # "sparse" (training, noisy) or "dense" (evaluation, FastEval14k-style)
    classes: str = CLASSES_FILE
    attribution: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    sample_format: SampleFormat = OWN_FORMAT

    @property
    def version(self) -> int:
        """The lowest format version that expresses this manifest (readers of version 1 cannot follow a
        sample format)."""
        return 1 if self.sample_format == OWN_FORMAT else 2

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_urls(self, prefix: str) -> list[str]:
        """Absolute shard URLs, resolving relative ones against the dataset prefix."""
        return [s.url if "://" in s.url or s.url.startswith("/") else join_url(prefix, s.url) for s in self.shards]

    def to_json(self) -> str:
        body = {"format": FORMAT_NAME, "version": self.version, "num_classes": self.num_classes,
                "num_samples": self.num_samples, "labels": self.labels, "classes": self.classes,
                "attribution": self.attribution, "extra": self.extra,
                "shards": [asdict(s) for s in self.shards]}
        if self.version > 1:
            body["sample_format"] = self.sample_format.to_dict()
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise ManifestError(f"{source}: not a shard manifest (expected format={FORMAT_NAME!r})")
        if body.get("version") not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"{source}: format version {body.get('version')!r} is not supported by this reader "
                f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); rewrite the shards or upgrade the pipeline"
            )
        try:
            shards = [ShardInfo(url=str(s["url"]), samples=int(s["samples"]), bytes=int(s.get("bytes", 0)))
                      for s in body["shards"]]
            manifest = cls(num_classes=int(body["num_classes"]), shards=shards, labels=body.get("labels", "sparse"),
                           classes=body.get("classes", CLASSES_FILE), attribution=body.get("attribution", ""),
                           extra=body.get("extra", {}),
                           sample_format=SampleFormat.from_dict(body.get("sample_format") or OWN_FORMAT.to_dict()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: missing or malformed field: {exc!r}") from exc
        if manifest.num_classes < 1 or any(s.samples < 0 for s in shards):
            raise ManifestError(f"{source}: num_classes must be >= 1 and shard sample counts >= 0")
        if "num_samples" in body and int(body["num_samples"]) != manifest.num_samples:
            raise ManifestError(f"{source}: num_samples={body['num_samples']} but the shards sum to "
                                f"{manifest.num_samples}")
        return manifest


def read_manifest(prefix: str, storage: StorageConfig | None = None) -> Manifest:
    """The manifest of the dataset at `prefix`; fails clearly if it is missing, malformed or of another version."""
    url = join_url(prefix, MANIFEST_FILE)
    return Manifest.from_json(read_bytes(url, storage).decode("utf-8"), source=url)


def write_manifest(prefix: str, manifest: Manifest, storage: StorageConfig | None = None) -> None:
    write_bytes(join_url(prefix, MANIFEST_FILE), manifest.to_json().encode("utf-8"), storage)


def classes_to_tsv(classes: list[ClassInfo]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(["id", "name", "train_frequency", "weight"])
    for c in classes:
        writer.writerow([c.id, c.name, c.train_frequency, "" if c.weight is None else c.weight])
    return out.getvalue()


def classes_from_tsv(text: str, source: str = CLASSES_FILE) -> list[ClassInfo]:
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not rows or rows[0][:3] != ["id", "name", "train_frequency"]:
        raise ManifestError(f"{source}: expected a header 'id<TAB>name<TAB>train_frequency<TAB>weight'")
    classes = []
    for line_no, row in enumerate(rows[1:], start=2):
        try:
            weight = float(row[3]) if len(row) > 3 and row[3] != "" else None
            classes.append(ClassInfo(id=int(row[0]), name=row[1], train_frequency=int(row[2]), weight=weight))
        except (IndexError, ValueError) as exc:
            raise ManifestError(f"{source}:{line_no}: malformed row {row!r}: {exc}") from exc
    ids = [c.id for c in classes]
    if ids != list(range(len(classes))):
        raise ManifestError(f"{source}: class ids must be 0..{len(classes) - 1} in order")
    return classes


def read_vocabulary(url: str, storage: StorageConfig | None = None) -> list[ClassInfo]:
    """The class list in the classes file at `url` (a local path or URL), e.g. the one an eval set must reuse."""
    return classes_from_tsv(read_bytes(url, storage).decode("utf-8"), source=url)


def read_classes(prefix: str, manifest: Manifest, storage: StorageConfig | None = None) -> list[ClassInfo]:
    """The classes (vocabulary) of the dataset at `prefix`, checked against the manifest's class count."""
    url = join_url(prefix, manifest.classes)
    classes = read_vocabulary(url, storage)
    if len(classes) != manifest.num_classes:
        raise ManifestError(f"{url}: {len(classes)} classes but the manifest says {manifest.num_classes}")
    return classes


def class_fingerprint(prefix: str, manifest: Manifest, storage: StorageConfig | None = None) -> dict[str, object]:
    """What a model's class ids mean: the classes file's URL, the class count, and the sha256 of the class names
    in id order (frequencies and weights left out, so a training set and its evaluation set compare equal)."""
    names = "\n".join(c.name for c in read_classes(prefix, manifest, storage))
    return {"classes": join_url(prefix, manifest.classes), "num_classes": manifest.num_classes,
            "sha256": hashlib.sha256(names.encode("utf-8")).hexdigest()}


def check_same_classes(trained: dict[str, Any] | None, eval_prefix: str, storage: StorageConfig | None) -> None:
    """Refuse eval data whose class ids mean other classes than the model's (MAP would be silently meaningless).

    `trained` is a `class_fingerprint` record (the training data's, or a checkpoint's); a checkpoint without one is
    evaluated on trust.
    """
    if trained is None:
        return
    found = class_fingerprint(eval_prefix, read_manifest(eval_prefix, storage), storage)
    if found["sha256"] == trained["sha256"]:
        return
    ours, theirs = found["num_classes"], trained["num_classes"]
    what = (f"class counts differ: {ours} vs {theirs}" if ours != theirs else
            f"the same {ours} ids, but other names or another order")
    raise ValueError(
        f"the eval data's classes ({found['classes']}, {ours} classes) are not the model's ({trained['classes']}, "
        f"{theirs} classes): {what}. An evaluation set must use the training set's classes (ids and names; classes "
        f"without images there are fine): write its shards with jobs/make_shards.py --vocab {trained['classes']} "
        f"(jobs/index_shards.py: index.classes={trained['classes']} index.frequencies=classes_file)")


def write_classes(prefix: str, classes: list[ClassInfo], storage: StorageConfig | None = None) -> None:
    write_bytes(join_url(prefix, CLASSES_FILE), classes_to_tsv(classes).encode("utf-8"), storage)
