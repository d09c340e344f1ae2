"""Where a shard's sample keeps its image and labels: the format a manifest records, and reading labels by it.

The project's own shards hold `KEY.jpg` and `KEY.json` with `{"labels": [class ids]}` (`OWN_FORMAT`). Shards
written by other tools (img2dataset, `webdataset.ShardWriter`, a dataset hub's WebDataset export) keep them
elsewhere; their manifest (`pipeline.data.adopt`) records a `SampleFormat`:

- `image`: the member extensions that hold the image (the first one present is used): jpg, jpeg, png, webp;
- `labels`: the member holding the labels: `cls` (class ids as text, webdataset's convention: one int, or several
  separated by spaces or commas), `json` (the `field` of a JSON object, a dotted path for nested objects; its
  value one label or a list), or `txt` (one label per line, or separated by `|` or `;`);
- `values`: `ids` (class ids 0..num_classes-1) or `names` (class names of the dataset's classes.tsv).

Members are matched by their last extension, as webdataset's decoders do: webdataset splits a member name into
key and extension at the first dot of its basename, so a key with dots (`photo.v2.jpg`) becomes key `photo` with
extension `v2.jpg`, whose image is found by its last part `jpg`. An exact extension is preferred.

`LabelReader.labels(sample)` gives a sample's class ids or raises `LabelError` with what is wrong; the loader
counts such a sample as "bad_label", the indexer as a bad sample, both naming shard and key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.config import IMAGE_EXTENSIONS

LabelMember = Literal["cls", "json", "txt"]
LabelValues = Literal["ids", "names"]
RawLabel = int | str


class LabelError(ValueError):
    """A sample whose labels cannot be read by the dataset's format; the message says what is wrong."""


@dataclass(frozen=True)
class SampleFormat:
    """Which members of a sample hold its image and its labels (see the module docstring)."""

    image: tuple[str, ...] = ("jpg", "jpeg", "png")
    labels: LabelMember = "json"
    field: str = "labels"  # json: the field (dotted path) holding the labels
    values: LabelValues = "ids"

    def __post_init__(self) -> None:
        unknown = [e for e in self.image if e not in IMAGE_EXTENSIONS]
        if not self.image or unknown:
            raise ValueError(f"image extensions must be some of {', '.join(IMAGE_EXTENSIONS)}, got {self.image}")
        if self.labels not in ("cls", "json", "txt"):
            raise ValueError(f"labels must be 'cls', 'json' or 'txt', got {self.labels!r}")
        if self.values not in ("ids", "names"):
            raise ValueError(f"label values must be 'ids' or 'names', got {self.values!r}")
        if self.labels == "cls" and self.values != "ids":
            raise ValueError(".cls members hold class ids (webdataset's convention); use labels=txt or json for names")
        if self.labels == "json" and not self.field:
            raise ValueError("labels=json needs the JSON field that holds the labels")

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["image"] = list(self.image)
        if self.labels != "json":
            del body["field"]
        return body

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> SampleFormat:
        return cls(image=tuple(body["image"]), labels=body["labels"], field=body.get("field", "labels"),
                   values=body["values"])


OWN_FORMAT = SampleFormat()


def member(sample: Mapping[str, Any], extension: str) -> tuple[str, Any] | None:
    """(member extension, value) of the sample's member with this extension, exactly or as its last part."""
    if extension in sample:
        return extension, sample[extension]
    tail = "." + extension
    for name, value in sample.items():
        if not name.startswith("__") and name.endswith(tail):
            return name, value
    return None


def image_member(sample: Mapping[str, Any], fmt: SampleFormat) -> Any | None:
    """The sample's image member (the first of the format's extensions present), or None."""
    for extension in fmt.image:
        found = member(sample, extension)
        if found is not None:
            return found[1]
    return None


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelError(f"{what} is not UTF-8 text: {exc}") from exc


def _json_field(data: bytes, path: str) -> Any:
    try:
        value: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"invalid JSON: {exc}") from exc
    for i, name in enumerate(path.split(".")):
        if not isinstance(value, dict) or name not in value:
            where = "the JSON" if i == 0 else f"JSON field {'.'.join(path.split('.')[:i])!r}"
            raise LabelError(f"no field {name!r} in {where}" + (f" (fields: {', '.join(sorted(value)[:8])})"
                                                                  if isinstance(value, dict) else ""))
        value = value[name]
    return value


def raw_labels(sample: Mapping[str, Any], fmt: SampleFormat, values: LabelValues | Literal["auto"] | None = None
               ) -> list[RawLabel]:
    """The labels as written (ints and/or strings), by `fmt`; `values` overrides the format's (the indexer passes
    "auto" before it knows whether the labels are ids or names). Raises LabelError."""
    values = values or fmt.values
    found = member(sample, fmt.labels)
    if found is None or found[1] is None:
        raise LabelError(f"no .{fmt.labels} member")
    name, data = found
    if fmt.labels == "json":
        value = _json_field(data, fmt.field)
        items = value if isinstance(value, list) else [value]
        where = f"JSON field {fmt.field!r}"
    else:
        text = _text(data, f".{name}")
        separators = r"[\s,]+" if fmt.labels == "cls" else r"[\r\n|;]+"
        items = [t.strip() for t in re.split(separators, text) if t.strip()]
        if values != "names":
            items = [int(t) if re.fullmatch(r"[+-]?\d+", t) else t for t in items]
        where = f".{name}"
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise LabelError(f"{where} holds {item!r} ({type(item).__name__}), not a class id or name")
        if values == "ids" and not isinstance(item, int):
            raise LabelError(f"{where} holds {item!r}, not an integer class id")
        if values == "names" and not isinstance(item, str):
            raise LabelError(f"{where} holds {item!r}, not a class name (label values are names)")
    return list(items)


@dataclass(frozen=True)
class LabelReader:
    """Reads a sample's class ids by a dataset's format: ids checked against `num_classes`, names looked up in
    `ids_by_name` (the dataset's classes.tsv). Picklable (it travels to DataLoader workers)."""

    fmt: SampleFormat
    num_classes: int
    ids_by_name: Mapping[str, int] = field(default_factory=dict)

    def ids(self, raw: Sequence[RawLabel]) -> list[int]:
        """Class ids of labels as written (sorted, each once); raises LabelError for an unknown one."""
        out = set()
        for label in raw:
            if isinstance(label, str):
                if label not in self.ids_by_name:
                    raise LabelError(f"label {label!r} is not a class name of this dataset's "
                                     f"{len(self.ids_by_name)} classes")
                out.add(self.ids_by_name[label])
            elif not 0 <= label < self.num_classes:
                raise LabelError(f"label {label} is outside 0..{self.num_classes - 1}")
            else:
                out.add(label)
        return sorted(out)

    def labels(self, sample: Mapping[str, Any]) -> list[int]:
        """The sample's class ids; raises LabelError naming what is missing or wrong."""
        return self.ids(raw_labels(sample, self.fmt))
