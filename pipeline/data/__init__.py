"""Data, by role: each sub-package's `__init__` names what the rest of the library uses.

- `format`: what a dataset prefix holds (manifest.json, classes.tsv, where a sample keeps its image and labels) and
  reading a shard's samples, the one routine the loader, prediction and the indexer share.
- `writing`: new shards from a folder + labels file or any samples (`jobs/make_shards.py`).
- `loading`: the streaming loader for training and evaluation (`ShardStream`): plan, read, decode, batch.
- `adopt`: manifests for shards other tools wrote, without rewriting them (`jobs/index_shards.py`).
- `demo`: the built-in demo datasets, generated offline.
"""
