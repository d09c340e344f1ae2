"""Writing new shards: samples (a folder + labels file, the demo, any iterable) -> shards, classes.tsv, manifest.json.

`writer` plans and runs a write (resumable), `build` writes one shard, `images` checks and re-encodes one image,
`labels` reads a labels file, `sizing` estimates shard bytes, `report` says what a write did.
"""

from pipeline.data.writing.build import Sample
from pipeline.data.writing.images import BadImageError
from pipeline.data.writing.labels import LabelsFileError, read_labels_file
from pipeline.data.writing.report import ShardReport
from pipeline.data.writing.writer import ShardWriteError, ShardWriter, num_workers, write_folder_shards

__all__ = [
    "BadImageError",
    "LabelsFileError",
    "Sample",
    "ShardReport",
    "ShardWriteError",
    "ShardWriter",
    "num_workers",
    "read_labels_file",
    "write_folder_shards",
]
