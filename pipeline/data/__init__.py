"""Data: the shard format and manifest, shard writing, the streaming loader, decoding and augmentation, the demo.

Names are imported lazily, so `pipeline.data.manifest` or the demo do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Manifest": "pipeline.data.manifest",
    "ManifestError": "pipeline.data.manifest",
    "ShardInfo": "pipeline.data.manifest",
    "ClassInfo": "pipeline.data.manifest",
    "read_manifest": "pipeline.data.manifest",
    "write_manifest": "pipeline.data.manifest",
    "read_classes": "pipeline.data.manifest",
    "read_vocabulary": "pipeline.data.manifest",
    "write_classes": "pipeline.data.manifest",
    "Batch": "pipeline.data.batch",
    "to_device": "pipeline.data.batch",
    "BadDataError": "pipeline.data.stream",
    "ShardStream": "pipeline.data.stream",
    "ShardSplitError": "pipeline.data.plan",
    "check_shard_split": "pipeline.data.plan",
    "ShardCache": "pipeline.data.cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
