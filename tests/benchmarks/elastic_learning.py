"""Elastic learning check: does a run learn the same whether its global batch is one pass, accumulated, or split
over 2 ranks that shrink to 1 halfway?

On the built-in demo data (the `demo` preset's, generated on first use), the same global batch and steps:

- **fixed**: 1 rank, each step's 32 images in one forward pass (the preset as it is);
- **accumulate**: 1 rank, `train.max_micro_batch_size=16`: two passes of 16 whose gradients add up;
- **elastic**: the same bound, 2 DDP ranks (gloo, in spawned processes; 16 images each, one pass) for the first
  half, then the run resumed from its checkpoint on 1 rank (two passes of 16; the rest of the epoch re-split), as an
  elastic run does after losing a node;
- **peer** (the reference for "the same within tolerance"): *fixed* with another data order (`data.seed=1`), so the
  tolerance is the difference a run shows anyway, from which images land in which batch.

Printed: the training loss averaged over windows of `--window` steps for every run, the largest difference of each
run's windows from *fixed*'s next to the peer's, and MAP@100 (per class, EMA weights) of the last checkpoint. A run
"matches" when its largest window difference is at most `--tolerance` x the peer's. Writes JSON.

    python tests/benchmarks/elastic_learning.py --steps 300 --out benchmark-results/elastic_learning.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from learning import _logged_losses  # the script's sibling: TensorBoard's loss curve of a run

from pipeline.checkpoint.format import latest_checkpoint
from pipeline.config import Config, load_config, validate
from pipeline.data.demo import prepare_demo_data
from pipeline.evaluation.evaluator import evaluate_checkpoint
from pipeline.train.loop import train
from pipeline.train.ranks import WorkerContext

RUNS = {"fixed": [], "accumulate": ["train.max_micro_batch_size=16"], "elastic": ["train.max_micro_batch_size=16"],
        "peer": ["data.seed=1"]}


class NodeLost(Exception):
    """Stands for the loss of a node: the 2-rank phase ends here, after the checkpoint at this step."""


def _rank(rank: int, raw: dict, stop_at: int, port: int) -> None:
    """One of 2 DDP ranks training the run, stopped (both at once) when `stop_at` steps are checkpointed."""
    import pipeline.train.loop as loop

    real_step = loop.train_step

    def step_until_lost(state, *args, **kwargs):
        if state.step >= stop_at:  # the checkpoint at stop_at is committed (checkpoint.background=false)
            raise NodeLost
        return real_step(state, *args, **kwargs)

    loop.train_step = step_until_lost
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        train(validate(raw), WorkerContext(rank=rank, world_size=2))
    except NodeLost:
        pass
    finally:
        dist.destroy_process_group()


def run(name: str, config: Config, steps: int, every: int) -> dict:
    """Train `steps` steps (elastic: half on 2 ranks, the rest on 1); the logged loss curve and the final MAP."""
    raw = config.model_dump(mode="json")
    raw["run"].update(storage=tempfile.mkdtemp(prefix="elastic-learning-"), name=name)
    raw["checkpoint"].update(every_steps=every, background=False)
    start = time.perf_counter()
    if name == "elastic":  # 2 ranks up to the half-way checkpoint, then 1 rank resumes from it
        mp.spawn(_rank, args=(raw, steps // 2, 29400 + os.getpid() % 1000), nprocs=2, join=True)
    train(validate(raw))
    wall = time.perf_counter() - start
    config = validate(raw)
    scalars = evaluate_checkpoint(latest_checkpoint(config.run_dir).url, config).result.scalars()
    return {"loss": _logged_losses(f"{config.run_dir}/tensorboard"), "map": scalars["map@100"],
            "image_map": scalars["image_map@100"], "wall_s": wall}


def windows(loss: list[tuple[int, float]], size: int) -> list[float]:
    """The logged loss averaged over consecutive windows of `size` steps."""
    out: dict[int, list[float]] = {}
    for step, value in loss:
        out.setdefault((step - 1) // size, []).append(value)
    return [sum(v) / len(v) for _, v in sorted(out.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--tolerance", type=float, default=1.5, help="x the peer's largest window difference")
    parser.add_argument("--out", default="benchmark-results/elastic_learning.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo preset for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = [f"train.total_steps={args.steps}", "train.log_every=1", *args.overrides]  # every step's loss: windows of 50
    demo = prepare_demo_data(load_config("demo", base))
    results = {}
    for name, overrides in RUNS.items():
        print(f"running {name} ...", flush=True)
        raw = load_config("demo", [*base, *overrides]).model_dump(mode="json")
        raw["data"].update(train=demo.data.train, eval=demo.data.eval)
        raw["model"]["num_classes"] = demo.model.num_classes
        results[name] = run(name, validate(raw), args.steps, args.steps // 2)
        results[name]["windows"] = windows(results[name]["loss"], args.window)
    fixed = results["fixed"]["windows"]
    for result in results.values():
        result["max_window_diff"] = max(abs(a - b) for a, b in zip(result["windows"], fixed, strict=True))
    tolerance = args.tolerance * results["peer"]["max_window_diff"]
    print(f"\nloss averaged per {args.window} steps; the largest difference from 'fixed' may be {tolerance:.3f} "
          f"({args.tolerance} x the peer's, which only changes the data order)")
    print(f"{'run':<12}" + "".join(f"{f'<= {(i + 1) * args.window}':>9}" for i in range(len(fixed)))
          + f"{'max diff':>10}{'matches':>9}{'MAP@100':>9}{'wall s':>8}")
    for name, result in results.items():
        result["matches"] = result["max_window_diff"] <= tolerance
        print(f"{name:<12}" + "".join(f"{w:>9.3f}" for w in result["windows"])
              + f"{result['max_window_diff']:>10.3f}{'yes' if result['matches'] else 'NO':>9}"
              + f"{100 * result['map']:>8.2f}%{result['wall_s']:>8.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "window": args.window, "tolerance": tolerance, "runs": results,
                               "overrides": args.overrides, "machine": {"platform": platform.platform(),
                                                                        "threads": torch.get_num_threads()}},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
