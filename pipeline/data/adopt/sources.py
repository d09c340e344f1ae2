"""Which shards an existing WebDataset is made of: a prefix's *.tar, a brace pattern, or a `wids` shard index.

- A prefix (`s3://bucket/laion/train`, a local folder): its `*.tar` objects, sorted by name.
- A pattern, webdataset's syntax (`s3://bucket/train-{000000..000999}.tar`, several joined by `::`), expanded
  with webdataset's own `expand_urls`.
- A `.json` file in webdataset's `wids` shard-index format (`widsindex create` writes it)::

      {"wids_version": 1, "shardlist": [{"url": "train-000000.tar", "nsamples": 1000, "filesize": ...}, ...],
       "base": "optional base URL", "datasets": [{"shardlist": [...]}, {"source_url": "other.json"}, ...]}

  As wids resolves it: shard URLs relative to `base` when it is given, else to the index's own location; a
  sub-dataset's (`datasets`) to its own `base`, else to its `source_url`'s location. `nsamples` is kept as each
  shard's count (the indexer can then skip walking the tars).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

from webdataset.shardlists import expand_urls

from pipeline.config import StorageConfig
from pipeline.storage import absolute_url, list_dir, read_bytes

SourceKind = Literal["prefix", "pattern", "wids"]


class ShardSourceError(ValueError):
    """A shard source that names no shards or cannot be read; the message names it."""


@dataclass(frozen=True)
class ShardList:
    """The shards of a source, in order, with the counts and sizes a wids index gives (None where unknown)."""

    kind: SourceKind
    source: str
    urls: list[str]
    counts: list[int | None]
    sizes: list[int | None]
    location: str  # the folder the shards were found in (a prefix, or the index's folder)


def parent_url(url: str) -> str:
    """The folder holding the object at `url` (s3://b/x/i.json -> s3://b/x)."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{posixpath.dirname(rest)}" if sep else posixpath.dirname(url) or "."


def resolve_url(base: str, url: str) -> str:
    """`url` resolved against the folder `base`: absolute URLs and paths unchanged, `./` and `../` folded."""
    if "://" in url or url.startswith("/"):
        return url
    scheme, sep, rest = base.rpartition("://")
    joined = posixpath.normpath(posixpath.join(rest if sep else base, url))
    return f"{scheme}{sep}{joined}" if sep else joined


def _wids_shards(body: Any, base: str, where: str, storage: StorageConfig | None,
                 depth: int = 0) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or body.get("wids_version") != 1:
        raise ShardSourceError(f"{where}: not a wids shard index (expected a JSON object with \"wids_version\": 1)")
    base = resolve_url(base, body["base"]) if isinstance(body.get("base"), str) else base
    shards = []
    for i, shard in enumerate(body.get("shardlist", [])):
        if not isinstance(shard, dict) or not isinstance(shard.get("url"), str):
            raise ShardSourceError(f"{where}: shardlist[{i}] needs a \"url\" (got {shard!r})")
        count = shard.get("nsamples")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise ShardSourceError(f"{where}: shardlist[{i}] ({shard['url']}): nsamples={count!r} is not a count")
        shards.append({**shard, "url": resolve_url(base, shard["url"])})
    for component in body.get("datasets", []):
        if depth > 0:
            raise ShardSourceError(f"{where}: a sub-dataset with its own sub-datasets (wids allows one level)")
        if isinstance(component, dict) and "source_url" in component:
            source = resolve_url(base, component["source_url"])
            sub = _read_json(source, storage)
            shards += _wids_shards({"wids_version": 1, **sub}, parent_url(source), source, storage, depth + 1)
        else:
            shards += _wids_shards({"wids_version": 1, **component}, base, f"{where} (datasets)", storage, depth + 1)
    return shards


def _read_json(url: str, storage: StorageConfig | None) -> Any:
    try:
        return json.loads(read_bytes(url, storage))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardSourceError(f"{url}: not valid JSON: {exc}") from exc


def list_shards(source: str, storage: StorageConfig | None = None) -> ShardList:
    """The shards `source` names (see the module docstring); local paths are made absolute."""
    source = absolute_url(source)
    if source.lower().endswith(".json"):
        shards = _wids_shards(_read_json(source, storage), parent_url(source), source, storage)
        if not shards:
            raise ShardSourceError(f"{source}: the wids index lists no shards")
        return ShardList("wids", source, [s["url"] for s in shards], [s.get("nsamples") for s in shards],
                         [s.get("filesize") for s in shards], parent_url(source))
    if "{" in source or "::" in source:
        urls = [absolute_url(u) for u in expand_urls(source)]
        kind: SourceKind = "pattern"
        location = parent_url(urls[0]) if urls else source
    else:
        urls = [u for u in list_dir(source, storage) if u.lower().endswith(".tar")]
        kind, location = "prefix", source.rstrip("/")
    if not urls:
        raise ShardSourceError(f"{source}: no shards found (expected *.tar objects under a prefix, a brace pattern "
                               "such as train-{000000..000099}.tar, or a wids index .json)")
    return ShardList(kind, source, urls, [None] * len(urls), [None] * len(urls), location)
