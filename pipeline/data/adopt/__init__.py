"""Adopting shards other tools wrote: their manifest.json and classes.tsv, written without rewriting a shard.

`sources` finds the shards (a prefix, a brace pattern, a wids index), `scan` walks one tar's headers with ranged
reads, `indexer` puts it together (`index_shards`, `jobs/index_shards.py`).
"""

from pipeline.data.adopt.indexer import AdoptError, IndexReport, index_shards

__all__ = ["AdoptError", "IndexReport", "index_shards"]
