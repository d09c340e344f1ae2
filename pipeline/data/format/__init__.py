"""The dataset format: the manifest and classes file of a dataset prefix, the sample format, reading a shard."""

from pipeline.data.format.manifest import (
    MANIFEST_FILE,
    ClassInfo,
    Manifest,
    ManifestError,
    ShardInfo,
    check_same_classes,
    class_fingerprint,
    classes_from_tsv,
    classes_to_tsv,
    read_classes,
    read_manifest,
    read_vocabulary,
    write_classes,
    write_manifest,
)
from pipeline.data.format.sample_format import (
    OWN_FORMAT,
    LabelError,
    LabelReader,
    RawLabel,
    SampleFormat,
    image_member,
    raw_labels,
)
from pipeline.data.format.tar_samples import ShardSamples, tar_members

__all__ = [
    "MANIFEST_FILE",
    "OWN_FORMAT",
    "ClassInfo",
    "LabelError",
    "LabelReader",
    "Manifest",
    "ManifestError",
    "RawLabel",
    "SampleFormat",
    "ShardInfo",
    "ShardSamples",
    "check_same_classes",
    "class_fingerprint",
    "classes_from_tsv",
    "classes_to_tsv",
    "image_member",
    "raw_labels",
    "read_classes",
    "read_manifest",
    "read_vocabulary",
    "tar_members",
    "write_classes",
    "write_manifest",
]
