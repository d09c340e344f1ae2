"""Learning benchmark: does the pipeline train a model that sees the images, and as fast as a plain PyTorch loop?

On built-in data (a preset's `data.demo`, generated on first use; `--datasets`: `demo`, the preset's own, and
`jft_like`, JFT's long tail, missing labels and combination classes in small, `pipeline.data.demo.shapes`),
for a fixed budget of steps:

- **pipeline** runs: the project's training loop (`pipeline.train.loop.train`, in this process), its streaming
  loader (its own worker processes), the preset's settings (default `demo`), a checkpoint every `--eval-every`
  steps; afterwards the project's evaluator scores each checkpoint (EMA weights, the evaluation transform).
  `--variant NAME=key=value,key=value` adds runs of the same preset with overrides; `paper-style` (TF-RMSprop
  epsilon 1.0 inside the root, Inception crops down to 8% of the image) is one by default, to show why the
  defaults are what they are. `--losses` adds one run per loss option (`LOSSES`: asymmetric, weak negatives,
  class-balanced), each the preset with that one change.
- **peer**: a plain PyTorch loop with no project code but the model: the same training images decoded once into
  memory (webdataset + Pillow, resized to the input size), random flips, Adam (lr 1e-3), `BCEWithLogitsLoss`,
  fp32, the same Xception and batch, evaluated at the same steps on the evaluation images resized the same way.
  Its wall time includes decoding the images into memory.
- **baselines**: random and class-prior scores of the same evaluation set (`pipeline.evaluation.baselines`).

Every number is MAP@100 as the project defines it (`pipeline.evaluation.map_at_k`), per class (the paper's), per
class over the head, middle and tail thirds of the classes by training frequency
(`pipeline.evaluation.frequency_thirds`), and per image. Wall times count training only (evaluation pauses the
peer's clock; the pipeline is evaluated after it has finished). Loss is reported as the pipeline logs it (for the
peer: its BCE summed over classes, averaged over images), so losses of different loss options do not compare.
The goals, per dataset: the pipeline reaches the peer's final per-class MAP@100 in no more wall time than the peer
took; and at the last step its per-class and tail-third MAP@100 are at least the peer's.
Prints a table per dataset (and one of MAP@100 per kind of class: colour, pair, ...) and writes JSON, a PNG of the
curves per dataset and one of the thirds. Each finished run is saved at once to `<out>.runs.json`; `--resume`
reuses those of an interrupted matrix. On a machine shared with other work set `OMP_WAIT_POLICY=PASSIVE`: torch's
OpenMP threads otherwise spin while they wait for a core another process holds (measured: a demo step 1.6 s
instead of 7.6 s with another process busy on one of 2 cores).

    python tests/benchmarks/learning.py --steps 600 --eval-every 100 --out benchmark-results/learning.json
    OMP_WAIT_POLICY=PASSIVE python tests/benchmarks/learning.py --datasets jft_like,demo --losses --no-paper-style \
        --steps 600 --eval-every 200 --out benchmark-results/learning-losses.json --resume
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint.format import committed_checkpoints
from pipeline.config import Config, load_config, validate
from pipeline.data.demo import prepare_demo_data
from pipeline.evaluation.baselines import BaselineScorers
from pipeline.evaluation.class_weights import class_prior, frequency_classes
from pipeline.evaluation.evaluator import evaluate_checkpoint
from pipeline.evaluation.frequency_thirds import FrequencyThirds
from pipeline.evaluation.map_at_k import MapAtKResult
from pipeline.evaluation.map_metric import evaluate_map_at_k
from pipeline.models import build_model
from pipeline.train.loop import train
from pipeline.train.ranks import WorkerContext

PAPER_STYLE = ["optimizer.epsilon=1.0", "data.augment.random_resized_crop=true", "data.augment.min_area=0.08",
               "data.augment.eval_crop_fraction=0.875"]
# What each dataset changes in the preset: the JFT-like data gets 1,000 evaluation images, so that its rarest pairs
# (about 1 object in 450) have a few positives each.
DATASETS = {"demo": [], "jft_like": ["data.demo.variant=jft_like", "data.demo.eval_images=1000"]}
# The loss options, each one change to the preset (values: docs, Training, "Losses"; Ridnik et al.'s for asymmetric).
LOSSES = {"asymmetric": ["loss.name=asymmetric"], "weak-negatives": ["loss.negative_weight=0.3"],
          "class-balanced": ["loss.class_frequency_power=0.5"]}
THIRD_KEYS = ("head", "middle", "tail")


# -- the pipeline -------------------------------------------------------------------------------------------------

class TimeCapReached(Exception):
    """Raised at a checkpoint past `run_pipeline`'s time cap: training stops there, its checkpoints are evaluated."""


def run_pipeline(config: Config, eval_every: int, ctx: WorkerContext | None = None,
                 time_cap_s: float | None = None) -> dict:
    """Train with the project's loop in this process (on `ctx`'s device), then evaluate every checkpoint with its
    evaluator. With `time_cap_s`, training stops at the first checkpoint after that many seconds ("capped")."""
    run = tempfile.mkdtemp(prefix="learning-")
    raw = config.model_dump(mode="json")
    raw["run"].update(storage=run, name="pipeline")
    raw["checkpoint"].update(every_steps=eval_every, keep_last=10_000, background=False)
    config = validate(raw)
    times: dict[int, float] = {}
    start = time.perf_counter()

    def on_report(record: dict, checkpoint: str | None) -> None:  # at checkpoint steps (Ray Train's report)
        times[record["step"]] = time.perf_counter() - start
        if time_cap_s is not None and times[record["step"]] > time_cap_s and record["step"] < config.train.total_steps:
            raise TimeCapReached(f"stopped after step {record['step']}: past the {time_cap_s:.0f} s cap")

    capped = None
    try:
        train(config, ctx, report=on_report)
    except TimeCapReached as error:
        capped = str(error)
    wall = time.perf_counter() - start
    points = []
    for ref in committed_checkpoints(config.run_dir, None):
        evaluation = evaluate_checkpoint(ref.url, config, reports_dir=f"{run}/reports")
        scalars = {**evaluation.result.scalars(), **(evaluation.by_frequency or {})}
        points.append({"step": ref.step, "seconds": times.get(ref.step, wall), "map": scalars["map@100"],
                       "image_map": scalars["image_map@100"],
                       **{third: scalars.get(f"{third}_map@100") for third in THIRD_KEYS}})
    return {"points": points, "loss": _logged_losses(f"{config.run_dir}/tensorboard"), "wall_s": wall,
            "baselines": evaluation.baselines, "capped": capped, "final_ap": _final_ap(evaluation.result)}


def _final_ap(result: MapAtKResult) -> list[float | None]:
    """Each class's AP@100 at the last evaluation (None: no positive in the evaluation set)."""
    return [float(ap) if valid else None for ap, valid in zip(result.per_class_ap, result.class_valid, strict=True)]


def _logged_losses(tensorboard_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("loss")]


# -- the plain PyTorch peer ---------------------------------------------------------------------------------------

def load_images(prefix: str, image_size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a local dataset prefix, resized to `image_size` (uint8 NCHW), and its multi-hot labels."""
    import webdataset as wds
    from PIL import Image

    manifest = json.loads(Path(prefix, "manifest.json").read_text())
    urls = [str(Path(prefix, shard["url"])) for shard in manifest["shards"]]
    images, targets = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((image_size, image_size),
                                                                            Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        target = torch.zeros(num_classes)
        target[json.loads(sample["json"])["labels"]] = 1.0
        targets.append(target)
    return torch.stack(images), torch.stack(targets)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def _scores(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(_normalise(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
    model.train()
    return out


def run_peer(config: Config, steps: int, eval_every: int, lr: float = 1e-3,
             thirds: FrequencyThirds | None = None) -> dict:
    """A plain PyTorch training loop on in-memory images (see the module docstring); `thirds` adds the head,
    middle and tail MAP@100 to its points."""
    torch.manual_seed(config.train.seed)
    start = time.perf_counter()
    size, num_classes = config.data.image_size, config.model.num_classes
    train_x, train_y = load_images(config.data.train, size, num_classes)
    clock = time.perf_counter() - start  # training time so far (evaluation is not counted)
    eval_x, eval_y = load_images(config.data.eval, size, num_classes)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batch, generator = config.train.global_batch_size, torch.Generator().manual_seed(config.train.seed)
    order, position = torch.randperm(len(train_x), generator=generator), 0
    points, losses = [], []
    resumed = time.perf_counter()
    for step in range(1, steps + 1):
        if position + batch > len(order):
            order, position = torch.randperm(len(train_x), generator=generator), 0
        index = order[position:position + batch]
        position += batch
        x = _normalise(train_x[index])
        flip = torch.rand(batch, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        y = train_y[index]
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.train.log_every == 0:
            losses.append((step, float(loss.detach()) * num_classes))  # as the pipeline logs it: sum over classes
        if step % eval_every == 0 or step == steps:
            clock += time.perf_counter() - resumed
            result = evaluate_map_at_k(_scores(model, eval_x), eval_y)
            scalars = result.scalars()
            if thirds is not None:
                scalars.update(thirds.maps(result.per_class_ap, result.class_valid, None, result.k))
            points.append({"step": step, "seconds": clock, "map": scalars["map@100"],
                           "image_map": scalars["image_map@100"],
                           **{third: scalars.get(f"{third}_map@100") for third in THIRD_KEYS}})
            resumed = time.perf_counter()
    return {"points": points, "loss": losses, "wall_s": clock, "eval_images": eval_y, "final_ap": _final_ap(result)}


# -- the report ---------------------------------------------------------------------------------------------------

def time_to(points: list[dict], target: float) -> float | None:
    """Wall seconds at the first evaluation whose per-class MAP@100 reaches `target` (None: never)."""
    return next((p["seconds"] for p in points if p["map"] >= target), None)


def plot(runs: dict[str, dict], baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in runs.items():
        seconds = [p["seconds"] for p in run["points"]]
        (line,) = axes[0].plot(seconds, [100 * p["map"] for p in run["points"]], marker="o", label=name)
        axes[1].plot(seconds, [100 * p["image_map"] for p in run["points"]], marker="o", color=line.get_color())
        axes[2].plot(*zip(*run["loss"], strict=True), color=line.get_color(), label=name)
    for ax, key in ((axes[0], "map@100"), (axes[1], "image_map@100")):
        ax.axhline(100 * baselines["prior"][key], linestyle="--", color="grey", label="class prior")
        ax.axhline(100 * baselines["random"][key], linestyle=":", color="grey", label="random")
        ax.set_xlabel("training wall time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MAP@100 per class (%)")
    axes[1].set_ylabel("MAP@100 per image (%)")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss (as logged)")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_thirds(results: dict[str, dict], path: Path) -> None:
    """One panel per dataset: each run's final MAP@100 per class, overall and per frequency third, beside the
    class prior's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ("all", *THIRD_KEYS)
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4), squeeze=False)
    for ax, (dataset, result) in zip(axes[0], results.items(), strict=True):
        names = [*result["runs"], "class prior"]
        width = 0.8 / len(names)
        prior = result["baselines"]["prior"]
        for i, name in enumerate(names):
            last = result["runs"][name]["points"][-1] if name in result["runs"] else None
            values = [_third_value(last, prior, group) for group in groups]
            ax.bar([g + i * width for g in range(len(groups))], [100 * (v or 0) for v in values], width, label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
        ax.set_ylabel("final MAP@100 per class (%)")
        ax.set_title(f"{dataset}: by training frequency of the class")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _third_value(point: dict | None, prior: dict, group: str) -> float | None:
    """A run's final MAP (`point`) or, with no point, the class prior's, overall ("all") or for one third."""
    if point is None:
        return prior["map@100"] if group == "all" else prior.get(f"{group}_map@100")
    return point["map"] if group == "all" else point.get(group)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def print_table(dataset: str, result: dict) -> None:
    """The dataset's table: final loss, MAP@100 per class (all, head, middle, tail), x prior, per image, wall s."""
    runs, baselines = result["runs"], result["baselines"]
    prior = baselines["prior"]
    peer_final = runs["peer"]["points"][-1]["map"] if "peer" in runs else None
    print(f"\n{dataset}: {result['num_classes']} classes (thirds {result['thirds']}); baselines on the evaluation "
          f"set: class prior {100 * prior['map@100']:.2f}% per class (head/middle/tail "
          f"{' / '.join(_percent(prior.get(f'{t}_map@100')) for t in THIRD_KEYS)}) / "
          f"{100 * prior['image_map@100']:.2f}% per image; random {100 * baselines['random']['map@100']:.2f}% / "
          f"{100 * baselines['random']['image_map@100']:.2f}%")
    header = (f"{'run':<16}{'final loss':>11}{'MAP@100':>9}{'x prior':>8}{'head':>7}{'middle':>7}{'tail':>7}"
              f"{'per image':>10}{'wall s':>8}")
    print(header + (f"{'s to peer final':>16}" if peer_final is not None else ""))
    for name, run in runs.items():
        last = run["points"][-1]
        row = (f"{name:<16}{run['loss'][-1][1]:>11.3f}{100 * last['map']:>8.2f}%"
               f"{last['map'] / prior['map@100']:>8.1f}{''.join(f'{_percent(last.get(t)):>7}' for t in THIRD_KEYS)}"
               f"{100 * last['image_map']:>9.2f}%{run['wall_s']:>8.0f}")
        if peer_final is not None:
            reached = time_to(run["points"], peer_final)
            row += f"{'never' if reached is None else f'{reached:.0f}':>16}"
        print(row)


def kind_maps(names: list[str], final_ap: list[float | None]) -> dict[str, tuple[float, int]]:
    """MAP@100 per kind of class (the part of its name before ":", e.g. colour, pair; "all" without one), with
    the number of classes it averages: which kinds a run learned."""
    kinds: dict[str, list[float]] = {}
    for name, ap in zip(names, final_ap, strict=True):
        if ap is not None:
            kinds.setdefault(name.partition(":")[0] if ":" in name else "all", []).append(ap)
    return {kind: (sum(values) / len(values), len(values)) for kind, values in kinds.items()}


def print_kinds(dataset: str, result: dict) -> None:
    """Final MAP@100 per kind of class, for every run."""
    table = {name: kind_maps(result["class_names"], run["final_ap"]) for name, run in result["runs"].items()}
    first = next(iter(table.values()))
    kinds = list(first)
    counts = ", ".join(f"{kind} {count}" for kind, (_, count) in first.items())
    print(f"\n{dataset}: final MAP@100 by kind of class (classes with an evaluation positive: {counts})")
    print(f"{'run':<16}" + "".join(f"{kind:>10}" for kind in kinds))
    for name, maps in table.items():
        print(f"{name:<16}" + "".join(f"{_percent(maps[kind][0]):>10}" for kind in kinds))


def judge(dataset: str, runs: dict[str, dict]) -> dict[str, bool] | None:
    """The goals against the peer (None without one): reaching its final MAP in its wall time, and its final
    per-class and tail-third MAP@100 at the same step."""
    if "peer" not in runs:
        return None
    peer, pipeline = runs["peer"], runs["pipeline"]
    peer_last, last = peer["points"][-1], pipeline["points"][-1]
    reached = time_to(pipeline["points"], peer_last["map"])
    goals = {"speed": reached is not None and reached <= peer["wall_s"], "map": last["map"] >= peer_last["map"],
             "tail": (last["tail"] or 0.0) >= (peer_last["tail"] or 0.0)}
    print(f"{dataset}: goal (pipeline reaches the peer's final MAP@100 {100 * peer_last['map']:.2f}% within the "
          f"peer's {peer['wall_s']:.0f} s): {'met' if goals['speed'] else 'NOT met'}")
    for key, what in (("map", "per-class MAP@100"), ("tail", "tail-third MAP@100")):
        ours, theirs = last[key], peer_last[key]
        verdict = "met" if goals[key] else f"missed by {100 * ((theirs or 0) - (ours or 0)):.1f} points"
        print(f"{dataset}: goal (pipeline's final {what} {_percent(ours)} >= the peer's {_percent(theirs)}): "
              f"{verdict}")
    return goals


# -- the runs -----------------------------------------------------------------------------------------------------

class FinishedRuns:
    """Each finished run's result, saved to `<out>.runs.json` as soon as it ends and reused by `--resume`: on a
    shared machine a matrix of runs can take hours, and an interrupted one goes on where it stopped. A run is
    reused only for exactly the same dataset, name, overrides, steps and evaluation cadence."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path, self.args = path, args
        self.runs: dict[str, dict] = json.loads(path.read_text()) if args.resume and path.exists() else {}

    def key(self, dataset: str, name: str, overrides: list[str]) -> str:
        args = self.args
        return json.dumps([args.preset, dataset, name, overrides, args.overrides, args.steps, args.eval_every])

    def get(self, dataset: str, name: str, overrides: list[str]) -> dict | None:
        run = self.runs.get(self.key(dataset, name, overrides))
        if run is not None:
            print(f"{dataset}: {name} reused from {self.path}", flush=True)
        return run

    def put(self, dataset: str, name: str, overrides: list[str], run: dict) -> dict:
        self.runs[self.key(dataset, name, overrides)] = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.runs))
        last = run["points"][-1]
        print(f"{dataset}: {name} MAP@100 {_percent(last['map'])}, tail {_percent(last['tail'])}", flush=True)
        return run


def run_dataset(args: argparse.Namespace, dataset: str, variants: dict[str, list[str]],
                finished: FinishedRuns) -> dict:
    """Every run of one dataset: the pipeline variants, then the peer and its baselines."""
    base = [f"train.total_steps={args.steps}", *DATASETS[dataset], *args.overrides]
    config = prepare_demo_data(load_config(args.preset, base))
    thirds = FrequencyThirds.of(class_prior(config))
    runs: dict[str, dict] = {}
    for name, overrides in variants.items():
        runs[name] = finished.get(dataset, name, overrides) or {}
        if not runs[name]:
            print(f"{dataset}: running {name} ...", flush=True)
            raw = load_config(args.preset, [*base, *overrides]).model_dump(mode="json")
            raw["data"].update(train=config.data.train, eval=config.data.eval)
            raw["model"]["num_classes"] = config.model.num_classes
            runs[name] = finished.put(dataset, name, overrides, run_pipeline(validate(raw), args.eval_every))
    if not args.no_peer:
        peer = [f"lr={args.peer_lr}"]
        runs["peer"] = finished.get(dataset, "peer", peer) or finished.put(dataset, "peer", peer,
                                                                            _peer_with_baselines(args, config, thirds))
    sizes = thirds.counts(torch.ones(config.model.num_classes, dtype=torch.bool))
    return {"num_classes": config.model.num_classes, "runs": runs, "baselines": runs["pipeline"]["baselines"],
            "class_names": [c.name for c in frequency_classes(config)],
            "thirds": "/".join(str(sizes[f"{t}_classes"]) for t in THIRD_KEYS), "frequency_thirds": thirds.ranges(),
            "data": {"train": config.data.train, "eval": config.data.eval}}


def _peer_with_baselines(args: argparse.Namespace, config: Config, thirds: FrequencyThirds) -> dict:
    """The peer's run, with the baselines of its evaluation set (the same images and labels as the pipeline's)."""
    print("running peer ...", flush=True)
    run = run_peer(config, args.steps, args.eval_every, args.peer_lr, thirds)
    eval_y = run.pop("eval_images")
    scorers = BaselineScorers.for_prior(class_prior(config), 100)
    scorers.update(eval_y, torch.arange(len(eval_y)))
    run["baselines"] = scorers.compute(None, thirds)
    return run


def variants_of(args: argparse.Namespace) -> dict[str, list[str]]:
    """The pipeline runs: the preset, paper-style (unless --no-paper-style), the loss options (--losses), and
    each --variant."""
    variants: dict[str, list[str]] = {"pipeline": []}
    if not args.no_paper_style:
        variants["paper-style"] = PAPER_STYLE
    if args.losses:
        variants.update(LOSSES)
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        variants[name] = overrides.split(",")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--datasets", default="demo", help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--losses", action="store_true", help=f"add a run per loss option: {', '.join(LOSSES)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=key=value,...",
                        help="an extra pipeline run with these overrides (repeatable)")
    parser.add_argument("--no-paper-style", action="store_true", help="skip the paper-style pipeline run")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-lr", type=float, default=1e-3)
    parser.add_argument("--out", default="benchmark-results/learning.json")
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs in <out>.runs.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets = args.datasets.split(",")
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        parser.error(f"--datasets: unknown {sorted(unknown)}; choose from {', '.join(DATASETS)}")
    variants = variants_of(args)
    out = Path(args.out)
    finished = FinishedRuns(out.with_suffix(".runs.json"), args)
    results = {dataset: run_dataset(args, dataset, variants, finished) for dataset in datasets}
    for dataset, result in results.items():
        print_table(dataset, result)
        print_kinds(dataset, result)
        result["goals"] = judge(dataset, result["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    for dataset, result in results.items():
        plot(result["runs"], result["baselines"], out.with_name(f"{out.stem}-{dataset}.png"))
    plot_thirds(results, out.with_name(f"{out.stem}-thirds.png"))
    out.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "overrides": args.overrides,
                               "variants": variants, "datasets": results,
                               "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}},
                              indent=1))
    print(f"wrote {out}, {out.stem}-<dataset>.png and {out.stem}-thirds.png beside it")


if __name__ == "__main__":
    main()
