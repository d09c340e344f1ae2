"""Write a WebDataset shard set (tars + manifest.json + classes.tsv) from a folder of images or the demo dataset.

    python jobs/make_shards.py --images DIR --labels labels.csv --out s3://bucket/jft/train
    python jobs/make_shards.py --images DIR --labels eval.jsonl --out s3://bucket/jft/eval --labels-kind dense \\
        --vocab s3://bucket/jft/train/classes.tsv
    python jobs/make_shards.py --demo tiny --split train --count 2000 --seed 0 --out ./data/demo/train

Re-running the same command resumes: published shards are kept, missing ones written, the manifest written last.
A prefix written with other settings or from other inputs (another --images folder or labels file) is refused;
shards.overwrite=true replaces it (shards of a run that found none of its images are rewritten without it).
shards.min_shards shards are cut when no shard gets under shards.min_shard_mb, and the summary names the cluster
sizes (ranks x loader workers) they support.
How shards are cut and images normalised are the `shards.*` settings (e.g. shards.max_shard_mb=64
shards.workers=8); storage is `storage.*` (credentials from the standard places: environment, AWS profile,
instance role; storage.endpoint_url=... or AWS_ENDPOINT_URL for S3-compatible servers). Formats and rules:
`pipeline/data/writing/writer.py`. Every setting and its default is listed below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from pipeline.cli import job_main
from pipeline.config import config_argument_parser, load_config
from pipeline.data.demo import write_demo_shards
from pipeline.data.format import read_vocabulary
from pipeline.data.writing import write_folder_shards
from pipeline.storage import require_bucket


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__)
    source = parser.add_argument_group("source: a folder of images and a labels file, or the demo dataset")
    source.add_argument("--images", help="folder (local path or URL) the labels file's paths are relative to")
    source.add_argument("--labels", help="labels file: .csv (path,labels with names separated by | or ;) or .jsonl")
    source.add_argument("--demo", choices=["openmoji", "tiny"], help="generate the built-in demo dataset")
    source.add_argument("--split", choices=["train", "eval"], default="train", help="demo split (default train)")
    source.add_argument("--count", type=int, help="demo: number of images")
    source.add_argument("--seed", type=int, default=0, help="demo: seed (default 0)")
    source.add_argument("--image-size", type=int, help="demo: image side in pixels (default: the demo's)")
    parser.add_argument("--out", required=True, help="dataset prefix URL (s3://..., gs://..., or a local path)")
    parser.add_argument("--vocab", help="classes.tsv of the training set: reuse its ids and frequencies (eval split)")
    parser.add_argument("--labels-kind", choices=["sparse", "dense"], default="sparse",
                        help="folder source: sparse (training) or dense (evaluation) labels; the demo sets it")
    parser.add_argument("--attribution", default="", help="folder source: licence/attribution text for the manifest")
    args = parser.parse_args(argv)
    if args.demo:
        if args.images or args.labels:
            parser.error("give either --demo or --images/--labels, not both")
        if not args.count or args.count < 1:
            parser.error("--demo needs --count N (N >= 1)")
    elif not (args.images and args.labels):
        parser.error("give --images DIR and --labels FILE, or --demo openmoji|tiny")
    return args


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    options, storage = config.shards, config.storage
    require_bucket(args.out, storage)  # a typo in the bucket is refused, not created
    vocabulary = read_vocabulary(args.vocab, storage) if args.vocab else None
    if args.demo:
        report = write_demo_shards(args.demo, args.split, args.count, args.seed, args.out, vocabulary=vocabulary,
                                   image_size=args.image_size, options=options, storage=storage)
    else:
        report = write_folder_shards(args.images, args.labels, args.out, vocabulary=vocabulary,
                                     labels=args.labels_kind, attribution=args.attribution, options=options,
                                     storage=storage)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
