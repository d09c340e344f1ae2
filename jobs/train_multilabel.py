"""Train a multi-label Xception with Ray Train DDP, checkpointing to object storage; print the final MAP@100.

    ray job submit --working-dir . -- python jobs/train_multilabel.py --config jft_xception \\
        data.train=s3://bucket/jft/train data.eval=s3://bucket/jft/eval run.storage=s3://bucket/runs run.name=x1

With no arguments it runs the `demo` preset end to end on this machine: a local Ray, the built-in demo dataset
(generated on first use), a few hundred steps, checkpoints, and the final MAP@100. Re-running a command with the
same run.storage/run.name resumes from its latest complete checkpoint. Settings are `key.sub=value` overrides of
the preset (YAML values); every setting and its default is listed below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from pipeline.cli import job_main
from pipeline.config import config_argument_parser, load_config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = config_argument_parser(__doc__)
    parser.add_argument("--no-eval", action="store_true", help="skip the final MAP@K evaluation")
    return parser.parse_args(argv)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)  # validated before any cluster resource is requested
    from pipeline.evaluation.watcher import evaluate_latest, start_background_evaluator
    from pipeline.storage import require_bucket
    from pipeline.train.launcher import launch, prepare

    require_bucket(config.run.storage, config.storage)  # a typo in run.storage's bucket is refused, not created
    # The demo dataset when data.demo stands in for data.train; data vs config vs cluster checks (refused: exit 2).
    config = prepare(config)
    background = start_background_evaluator(config) if config.eval.with_training else None
    metrics = launch(config)
    print(f"training finished at step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}")
    if background is not None:
        background.finish()  # the evaluator beside training reports the final checkpoint too
    if not args.no_eval and config.data.eval:
        print(evaluate_latest(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
