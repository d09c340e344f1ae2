"""The schema's sections for writing datasets: cutting new shards (`shards`) and indexing existing ones (`index`).

Part of the one configuration schema (`pipeline.config.schema.Config` holds them as `shards` and `index`); kept
apart because they configure the dataset jobs (`jobs/make_shards.py`, `jobs/index_shards.py`), not a training run.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, PositiveInt

from pipeline.config.section import Section

ImageExtension = Literal["jpg", "jpeg", "png", "webp"]
IMAGE_EXTENSIONS: tuple[ImageExtension, ...] = get_args(ImageExtension)  # the members a shard sample's image may be


class ShardsConfig(Section):
    """How jobs/make_shards.py cuts WebDataset shards and normalises images (pipeline.data.writing.writer).

    max_image_side = 512: training crops are resized to 299 (the paper's), so a longer side of 512 keeps the
    shorter side >= 299 for aspect ratios up to 1.7:1, while decoding stays cheap (measured on a 2-core machine:
    ~600 decodes+crops/s per core at 500x375 versus ~100/s at 1024x768) and shards stay ~3-4x smaller than at full
    resolution.

    min_shards = 32 lets a dataset of any size run on 8 ranks x 4 loader workers (or 16 x 2, 32 x 1): below
    32 x 256 MiB shards shrink instead of refusing the launch. min_shard_mb = 4: at ~600 images/s of ~65 KB a loader
    worker reads ~40 MB/s, so a 4 MiB shard is ~0.1 s of work, about one S3 first-byte latency (AWS quotes 100-200
    ms; the local SeaweedFS measured ~7 ms per open); smaller shards would spend longer opening than reading. Only
    datasets under 128 MiB, whose epochs take seconds, make fewer than 32 shards.
    """

    max_shard_mb: float = Field(256.0, ge=1 / 16, description="target shard size in MiB (2**20 bytes; at least "
                                "1/16 = 64 KiB)")
    min_shards: PositiveInt | None = Field(
        32, description="aim for at least this many shards, so that cluster.num_workers x data.loader_workers slots "
        "each get their own (32: 8 ranks x 4 loader workers): shards shrink below max_shard_mb to reach it, but not "
        "below min_shard_mb; None = cut by max_shard_mb alone. Applies to inputs sized before writing (a folder, a "
        "list), not to streamed iterators")
    min_shard_mb: float = Field(4.0, ge=1 / 16, description="the smallest shard size (MiB) min_shards may lead to: "
                                "below it a shard takes less time to read than to open on S3")
    max_shard_samples: PositiveInt | None = Field(None, description="also close a shard at this many input items")
    samples_per_shard: PositiveInt | None = Field(
        None, description="cut shards by count instead of size (no size estimates); overrides max_shard_mb")
    max_image_side: int = Field(512, ge=16, description="downscale images whose longer side is larger")
    jpeg_quality: int = Field(90, ge=1, le=100, description="quality of re-encoded images")
    workers: int | None = Field(None, ge=0, description="writer processes; None = all cores, 0 or 1 = in the job's "
                                "process")
    tmp_dir: str | None = Field(None, description="local directory for shards being built; None = the system's")
    progress: bool = Field(True, description="a progress bar on stderr")
    overwrite: bool = Field(False, description="replace a dataset written at the prefix with other settings or "
                            "from other inputs (images folder, labels file): its manifest is removed first, its "
                            "shards rewritten, the new manifest written last (without it such a prefix is refused, "
                            "to keep re-runs resumable)")

    @property
    def max_shard_bytes(self) -> int:
        return int(self.max_shard_mb * 2**20)

    @property
    def min_shard_bytes(self) -> int:
        return int(self.min_shard_mb * 2**20)


class IndexConfig(Section):
    """How jobs/index_shards.py indexes WebDataset shards written by other tools, in place (pipeline.data.adopt).

    The mapping says where each sample keeps its labels; it is recorded in the manifest, so training and the
    evaluator read the shards with no further settings.
    """

    labels: Literal["cls", "json", "txt"] = Field(
        "cls", description="the member holding the labels: cls (class ids as text, webdataset's convention), json "
        "(a field of a JSON object, see json_field) or txt (one label per line, or separated by | or ;)")
    json_field: str = Field("label", min_length=1, description="labels=json: the field holding the labels (a "
                            "dotted path for nested objects, e.g. annotations.classes); one value or a list")
    label_values: Literal["auto", "ids", "names"] = Field(
        "auto", description="labels are class ids (0..num_classes-1) or class names; auto: ids for cls, else what "
        "the shards hold (all integers: ids, all strings: names)")
    classes: str | None = Field(
        None, description="a classes file fixing class ids and names: a classes.tsv (e.g. the training set's, to "
        "index an eval set) or a text file of one class name per line (id = line number); None: names are ordered by "
        "frequency (most frequent first), ids named by their number")
    num_classes: PositiveInt | None = Field(None, description="label_values=ids without a classes file: the class "
                                            "count (None: the largest id seen + 1)")
    frequencies: Literal["count", "classes_file", "skip"] = Field(
        "count", description="classes.tsv's train_frequency: count (read every label member), classes_file (copy "
        "the given classes.tsv's frequencies and weights, as for an eval set), skip (zeros; labels are not read, "
        "so with a wids index giving counts no shard is opened)")
    image_extensions: list[ImageExtension] = Field(
        default_factory=lambda: list(IMAGE_EXTENSIONS), min_length=1,
        description="members that hold the image, the first present is used")
    labels_kind: Literal["sparse", "dense"] = Field("sparse", description="sparse (training, noisy) or dense "
                                                    "(evaluation) labels, recorded in the manifest")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="fail above this fraction of samples without "
                                    "an image or with unreadable labels (a wrong mapping), naming shards and keys")
    workers: PositiveInt = Field(32, description="shards read at once (threads; reads wait on the network)")
    block_kib: PositiveInt = Field(16, description="bytes per ranged read (KiB): an image larger than this costs "
                                   "one read of this size to skip; shards of images smaller than it are read in "
                                   "fewer, larger reads (1024: about a whole-shard read in 1 MiB pieces)")
    progress: bool = Field(True, description="a progress bar on stderr")
