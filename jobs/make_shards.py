"""Write a WebDataset shard set (tars + manifest.json + classes.tsv) from a folder of images or the demo dataset.

    python jobs/make_shards.py --images DIR --labels labels.csv --out s3://bucket/jft/train
    python jobs/make_shards.py --images DIR --labels eval.jsonl --out s3://bucket/jft/eval --labels-kind dense \
        --vocab s3://bucket/jft/train/classes.tsv
    python jobs/make_shards.py --demo tiny --split train --count 2000 --seed 0 --out ./data/demo/train

Re-running the same command resumes: published shards are kept, missing ones written, the manifest written last.
Storage: credentials from the standard places (environment, AWS profile, instance role); `--endpoint-url` (or
AWS_ENDPOINT_URL) for S3-compatible servers. Formats and rules: `pipeline/data/shards.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from pipeline.cli import job_main
from pipeline.config import StorageConfig
from pipeline.data.shards import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_IMAGE_SIDE,
    ShardOptions,
    read_vocabulary,
    write_demo_shards,
    write_folder_shards,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    shards = parser.add_argument_group("shards and images")
    shards.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MiB (default 256)")
    shards.add_argument("--max-shard-samples", type=int, help="also close a shard at this many samples")
    shards.add_argument("--samples-per-shard", type=int, help="cut shards by count instead of size")
    shards.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                        help=f"downscale images whose longer side is larger (default {DEFAULT_MAX_IMAGE_SIDE})")
    shards.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help=f"quality of re-encoded images (default {DEFAULT_JPEG_QUALITY})")
    shards.add_argument("--workers", type=int, help="processes (default: all cores)")
    shards.add_argument("--tmp-dir", help="local directory for shards being built (default: system temp)")
    shards.add_argument("--no-progress", action="store_true", help="no progress bar")
    storage = parser.add_argument_group("storage (credentials come from the environment / AWS profile / role)")
    storage.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    storage.add_argument("--region", help="S3 region")
    storage.add_argument("--profile", help="AWS profile name")
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
    storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)
    options = ShardOptions(max_shard_bytes=int(args.shard_size_mb * 2**20),
                           max_shard_samples=args.max_shard_samples, samples_per_shard=args.samples_per_shard,
                           max_image_side=args.max_image_side, jpeg_quality=args.jpeg_quality,
                           workers=args.workers, progress=not args.no_progress, tmp_dir=args.tmp_dir)
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
