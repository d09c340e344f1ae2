"""Index WebDataset shards written by other tools (img2dataset, webdataset.ShardWriter, a hub's export) in place.

    python jobs/index_shards.py --shards s3://bucket/laion/train index.labels=json index.json_field=label
    python jobs/index_shards.py --shards 's3://bucket/in1k/train-{000000..001023}.tar' index.labels=cls \\
        --out s3://my-bucket/in1k-train-index
    python jobs/index_shards.py --shards s3://bucket/eval/wids.json index.labels=txt \\
        index.classes=s3://bucket/train/classes.tsv index.frequencies=classes_file index.labels_kind=dense

Writes manifest.json and classes.tsv beside the shards (or under --out when their location is read-only; the
manifest then names them by absolute URL), without rewriting or downloading them: tar headers are walked with
ranged reads, only the label members are read. The label mapping is recorded in the manifest, so training
(data.train=PREFIX) and the evaluator need no further settings. Shards: a prefix (its *.tar), a brace pattern, or
a wids shard index (.json). The mapping and the indexing are the `index.*` settings, storage is `storage.*`;
every setting and its default is listed below. Formats and rules: `pipeline/data/adopt/`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from pipeline.cli import job_main
from pipeline.config import config_argument_parser, load_config
from pipeline.data.adopt import index_shards
from pipeline.storage import require_bucket


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__)
    parser.add_argument("--shards", required=True,
                        help="the shards: a prefix (its *.tar), a brace pattern, or a wids index .json")
    parser.add_argument("--out", help="where manifest.json and classes.tsv go (default: beside the shards)")
    return parser.parse_args(argv)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.out:  # beside the shards, the bucket exists
        require_bucket(args.out, config.storage)
    report = index_shards(args.shards, args.out, config.index, config.storage)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
