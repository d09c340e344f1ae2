"""Fine-tuning benchmark: does starting from another run (`model.init_from`) beat training from scratch?

On the built-in demo data: a **source** run trains the `demo` model on one class set (by default the OpenMoji demo
over its whole emoji catalogue: ~630 classes from group, subgroup and tag names), then two runs train on another
class set (the `demo` preset's own data: the 100 most common emoji, tags shared by at least 3 of them) for the same
steps: **scratch** (a fresh model) and **fine-tune** (`model.init_from=<source run>`: its EMA backbone, a fresh
head). `--variant NAME=key=value,...` adds fine-tune runs with other settings (e.g.
`optimizer.backbone_lr_multiplier=0.1`). Every run is scored by the project's evaluator at every checkpoint (MAP@100
per class and per image, EMA weights) on the target's in-domain evaluation set, beside its class-prior baseline.
Prints a table and writes JSON.

    python tests/benchmarks/finetune.py --source-steps 300 --steps 200 --eval-every 50
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from learning import run_pipeline

from pipeline.config import load_config, validate
from pipeline.data.demo import prepare_demo_data
from pipeline.train.loop import train

SOURCE = ["data.demo.catalog_size=null", "data.demo.min_tag_count=5"]  # the whole OpenMoji catalogue


def train_source(steps: int, overrides: list[str]) -> tuple[str, int, float]:
    """The source run: (its run directory, its class count, wall seconds)."""
    config = prepare_demo_data(load_config("demo", [f"train.total_steps={steps}", *SOURCE, *overrides]))
    raw = config.model_dump(mode="json")
    raw["run"].update(storage=tempfile.mkdtemp(prefix="finetune-source-"), name="source")
    raw["checkpoint"].update(every_steps=steps, background=False)
    config = validate(raw)
    start = time.perf_counter()
    train(config)
    return config.run_dir, config.model.num_classes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="steps of each run on the target class set")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=key=value,...",
                        help="an extra fine-tune run with these overrides (repeatable)")
    parser.add_argument("--out", default="benchmark-results/finetune.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo preset for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"training the source run ({args.source_steps} steps) ...", flush=True)
    source_dir, source_classes, source_wall = train_source(args.source_steps, args.overrides)
    target = prepare_demo_data(load_config("demo", [f"train.total_steps={args.steps}", *args.overrides]))
    variants = {"scratch": [], "fine-tune": [f"model.init_from={source_dir}"]}
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = [f"model.init_from={source_dir}", *overrides.split(",")]
    runs = {}
    for name, overrides in variants.items():
        print(f"running {name} ...", flush=True)
        raw = load_config("demo", [f"train.total_steps={args.steps}", *args.overrides, *overrides]).model_dump(
            mode="json")
        raw["data"].update(train=target.data.train, eval=target.data.eval)
        raw["model"]["num_classes"] = target.model.num_classes
        runs[name] = run_pipeline(validate(raw), args.eval_every)

    baselines = runs["scratch"]["baselines"]
    prior, prior_image = baselines["prior"]["map@100"], baselines["prior"]["image_map@100"]
    print(f"\nsource: {source_classes} classes, {args.source_steps} steps ({source_wall:.0f} s); target: "
          f"{target.model.num_classes} classes, class prior {100 * prior:.2f}% per class / "
          f"{100 * prior_image:.2f}% per image")
    steps = [p["step"] for p in runs["scratch"]["points"]]
    print(f"{'run':<14}" + "".join(f"{f'step {s}':>16}" for s in steps) + f"{'wall s':>8}")
    for name, run in runs.items():
        cells = "".join(f"{100 * p['map']:>9.1f}% /{100 * p['image_map']:>4.0f}%" for p in run["points"])
        print(f"{name:<14}{cells}{run['wall_s']:>8.0f}")
    print("(MAP@100 per class / per image at each step)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source_steps": args.source_steps, "steps": args.steps, "overrides": args.overrides,
                               "source": {"classes": source_classes, "wall_s": source_wall, "overrides": SOURCE},
                               "target_classes": target.model.num_classes, "variants": variants,
                               "baselines": baselines, "runs": runs,
                               "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
