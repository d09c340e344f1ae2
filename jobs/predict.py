"""Predict labels for images with a trained run's model, on Ray Data: shards, a folder, or a list of image URLs.

    python jobs/predict.py --config multilabel run.storage=s3://bucket/runs run.name=x1 \\
        predict.input=s3://bucket/photos predict.output=s3://bucket/predictions/x1
    ray job submit --working-dir . -- python jobs/predict.py --config multilabel predict.model=s3://bucket/runs/x1 \\
        predict.input=s3://bucket/jft/eval predict.output=s3://bucket/predictions/x1 \\
        predict.concurrency=4 predict.num_gpus=1 predict.batch_size=256

The model is `predict.model` (a run directory or a checkpoint URL; default run.storage/run.name): its latest
complete checkpoint's EMA weights, decoded as the evaluator does, with the decision thresholds the evaluator wrote
for that step. Output: <predict.output>/part-NNNNNN.parquet (or .jsonl with predict.format=jsonl) with key,
top_classes, top_scores, labels and error per image; failures.jsonl; summary.json. Re-running the same command
skips the parts already written. Settings: `predict.*` (see --help).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from pipeline.cli import job_main
from pipeline.config import config_argument_parser, load_config


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = config_argument_parser(__doc__).parse_args(argv)
    config = load_config(args.config, args.overrides)
    from pipeline.inference.predict import run_prediction
    from pipeline.storage import require_bucket

    if config.predict.output:
        require_bucket(config.predict.output, config.storage)
    summary = run_prediction(config)
    print(f"{summary['images']} images predicted into {config.predict.output} ({summary['failed']} failed, listed "
          f"in {summary['failures']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
