"""Export a trained run's checkpoint as a model package that loads without the training code.

    python jobs/export_model.py --config multilabel run.storage=s3://bucket/runs run.name=x1
    python jobs/export_model.py --checkpoint s3://bucket/runs/x1/checkpoints/step-000020000 \\
        --out s3://bucket/models/x1 export.formats=[safetensors,onnx] export.weights=raw

Takes the run's latest complete checkpoint (or --checkpoint) and writes, to --out (default
<run>/export/step-NNNNNNNNN): model.safetensors (EMA weights unless export.weights=raw), model.json (architecture,
input size and preprocessing, class names, the evaluator's per-class thresholds for that step when it wrote them,
where it came from), and per export.formats a torch.export program (model.pt2) and ONNX (model.onnx, needs
`pip install -e '.[export]'`), each checked against the eager model on real images before it is written.
Load a package with `pipeline.models.package.read_package` (torch + safetensors only).
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
    parser.add_argument("--checkpoint", help="export this checkpoint URL instead of the run's latest")
    parser.add_argument("--out", help="the package directory URL (default <run>/export/step-NNNNNNNNN)")
    return parser.parse_args(argv)


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    from pipeline.inference.export import export_model
    from pipeline.storage import require_bucket

    if args.out:  # by default the package goes into the run directory, whose bucket exists
        require_bucket(args.out, config.storage)
    result = export_model(args.checkpoint or config.run_dir, config, out=args.out)
    programs = result.metadata["programs"]
    checks = "; ".join(f"{fmt}: max |logit - eager| {r['max_abs_logit_difference']:.1e}, {r['export_seconds']} s"
                       for fmt, r in programs.items())
    print(f"exported step {result.metadata['source']['step']} ({result.metadata['weights']['kind']} weights) to "
          f"{result.url}" + (f" ({checks})" if checks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
