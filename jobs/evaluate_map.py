"""Evaluate a run's checkpoints with MAP@100 on the dense evaluation set and write the reports.

    python jobs/evaluate_map.py --config jft_xception data.eval=s3://bucket/jft/eval \\
        run.storage=s3://bucket/runs run.name=x1                     # watch: evaluate each new checkpoint,
                                                                     # ending after the run's final one
    python jobs/evaluate_map.py --config jft_xception ... --once       # evaluate what is there, then exit
    python jobs/evaluate_map.py --config jft_xception ... --until-step 40000   # a run resumed to 40,000 steps
    python jobs/evaluate_map.py --checkpoint s3://bucket/runs/x1/checkpoints/step-000100000

Each checkpoint's model comes from its saved config; how it is evaluated (eval.k, eval.class_weights,
eval.weights, eval.batch_size, eval.max_images, data.loader_workers, storage.*, cluster.use_gpu, and data.eval
when given) from this command's config. Results: <run>/reports/map100.jsonl (one line per checkpoint, naming k,
the class weighting and ema/raw) and <run>/reports/report.html. A checkpoint already in map100.jsonl is not
evaluated again, so the evaluator can be restarted at any time; run one evaluator per run. Runs standalone or as
its own Ray job (`ray job submit --working-dir . -- python jobs/evaluate_map.py ...`); `--workers N` scores the
eval set in N parallel Ray tasks, each asking for 1 CPU, 1 GPU when cluster.use_gpu=true, and eval.resources.
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
    parser.add_argument("--checkpoint", help="evaluate this one checkpoint URL (its run directory gets the report)")
    parser.add_argument("--once", action="store_true", help="evaluate the checkpoints present now, then exit; with "
                        "nothing to evaluate it says why, and a run that does not exist exits with code 2")
    parser.add_argument("--until-step", type=int, help="stop once a checkpoint at or after this step is evaluated "
                        "(default: once the run's final checkpoint, at the train.total_steps saved with it, is)")
    parser.add_argument("--workers", type=int, default=1, help="parallel Ray tasks scoring the eval set")
    return parser.parse_args(argv)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    from pipeline.checkpoint.format import run_dir_of
    from pipeline.evaluation.watcher import CheckpointWatcher, summarize

    run_dir = run_dir_of(args.checkpoint) if args.checkpoint else config.run_dir
    watcher = CheckpointWatcher(run_dir, config, workers=args.workers)
    once = args.once or bool(args.checkpoint)
    if once:
        watcher.require_run(args.checkpoint)  # a typo in run.name is refused (exit 2), not an empty success
    evaluations = watcher.run(once=once, until_step=args.until_step, only=args.checkpoint)
    for evaluation in evaluations:
        summary = summarize(evaluation.record(), orientation=evaluation.config.eval.orientation)
        print(f"step {evaluation.step}: {summary}")
    if once and not evaluations:
        print(watcher.nothing_to_evaluate(args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
