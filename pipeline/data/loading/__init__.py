"""The streaming loader: one rank's batches from a dataset prefix (`ShardStream`) for training and evaluation.

The epoch plan (`plan`) says which samples each (rank, loader worker) slot reads; the workers (`workers`) read the
shards (`shard_reader`, through the local `cache`), decode (`decode`) and batch them (`batch`); `stream` is the
main process's side.
"""

from pipeline.data.loading.batch import Batch, to_device
from pipeline.data.loading.cache import ShardCache
from pipeline.data.loading.decode import BadSampleError, decode_image, empty_image
from pipeline.data.loading.plan import ShardSplitError, Split, check_shard_split, train_plan
from pipeline.data.loading.stream import BadDataError, ShardStream, job_metrics

__all__ = [
    "BadDataError",
    "BadSampleError",
    "Batch",
    "ShardCache",
    "ShardSplitError",
    "ShardStream",
    "Split",
    "check_shard_split",
    "decode_image",
    "empty_image",
    "job_metrics",
    "to_device",
    "train_plan",
]
