"""Prediction output: one file per input part, written when the part is complete, so that a re-run skips it.

Layout under `predict.output` (any fsspec URL)::

    part-000000.parquet (or .jsonl)   key, top_classes, top_scores, labels, error: one row per input image
    _progress/part-000000.json        written after its part file: rows, failures, the part's input digest
    _predict.json                     what the predictions are of (model, step, thresholds, top_k, input, format)
    failures.jsonl                    every image that could not be read or decoded: {"key", "error"}
    summary.json                      counts of the whole output, rewritten at the end of each run

Resuming: a part counts as done when its progress marker exists with the digest of the part as planned now (each
file is written atomically, the part file before its marker). A re-run against an output whose `_predict.json`
names another model, step, top_k or format is refused: one output holds one model's predictions.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.storage import exists, join_url, list_dir, read_bytes, write_bytes

PROGRESS = "_progress"
IDENTITY = "_predict.json"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("top_classes", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.string())), ("error", pa.string()),
])
IDENTITY_KEYS = ("model", "step", "thresholds_step", "top_k", "format", "weights")


def part_name(part: int) -> str:
    return f"part-{part:06d}"


def check_identity(output: str, identity: dict[str, Any], storage: StorageConfig | None = None) -> None:
    """Record what `output` holds predictions of, or refuse to add to one that holds another model's."""
    url = join_url(output, IDENTITY)
    if exists(url, storage):
        found = json.loads(read_bytes(url, storage))
        differing = {k: (found.get(k), identity.get(k)) for k in IDENTITY_KEYS if found.get(k) != identity.get(k)}
        if differing:
            details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
            raise ValueError(f"predict.output={output} already holds other predictions ({details}); use another "
                             "predict.output or remove it")
    write_bytes(url, json.dumps(identity, indent=1).encode(), storage)


def finished_parts(output: str, parts: list[dict], storage: StorageConfig | None = None) -> dict[int, dict]:
    """The progress markers of the planned `parts` that are done (same part number and digest)."""
    present = {url.rsplit("/", 1)[-1] for url in list_dir(join_url(output, PROGRESS), storage)}
    wanted = [p for p in parts if f"{part_name(p['part'])}.json" in present]

    def read(part: dict) -> dict:
        return json.loads(read_bytes(join_url(output, PROGRESS, f"{part_name(part['part'])}.json"), storage))

    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(read, wanted))
    return {p["part"]: m for p, m in zip(wanted, markers, strict=True) if m.get("digest") == p["digest"]}


def encode(table: pa.Table, fmt: str) -> bytes:
    """A part's rows as Parquet or JSON lines."""
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    return "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode("utf-8")


def write_part(output: str, part: dict, table: pa.Table, fmt: str, storage: StorageConfig | None = None) -> dict:
    """Write a complete part's rows (OUTPUT_SCHEMA), then its progress marker; returns the marker."""
    name = part_name(part["part"])
    table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    write_bytes(join_url(output, f"{name}.{fmt}"), encode(table, fmt), storage)
    errors = table.filter(pc.is_valid(table["error"])).select(["key", "error"]).to_pylist()
    marker = {"part": part["part"], "digest": part["digest"], "file": f"{name}.{fmt}", "rows": table.num_rows,
              "failed": len(errors), "failures": errors}
    write_bytes(join_url(output, PROGRESS, f"{name}.json"), json.dumps(marker).encode(), storage)
    return marker


def write_summary(output: str, markers: Iterable[dict], extra: dict[str, Any],
                  storage: StorageConfig | None = None) -> dict[str, Any]:
    """failures.jsonl (every part's failures, in part order) and summary.json; returns the summary."""
    ordered = sorted(markers, key=lambda m: m["part"])
    failures = [f for m in ordered for f in m["failures"]]
    write_bytes(join_url(output, FAILURES), "".join(json.dumps(f) + "\n" for f in failures).encode(), storage)
    summary = {"parts": len(ordered), "images": sum(m["rows"] for m in ordered), "failed": len(failures),
               "failures": join_url(output, FAILURES), **extra}
    write_bytes(join_url(output, SUMMARY), json.dumps(summary, indent=1).encode(), storage)
    return summary
