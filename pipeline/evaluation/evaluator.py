"""Score a checkpoint on the dense evaluation set: MAP@K and companions, one streaming pass.

A checkpoint carries its own resolved config (`config.yaml`): what the checkpoint *is* (model, image size, training
data and classes) comes from it, so the evaluator rebuilds exactly the model that was trained; how to *evaluate*
it (`eval.*`, `storage`, `cluster.use_gpu`, the loader settings of the evaluating machine, `data.eval` when set)
comes from the evaluator's own config (`resolve_config`). It loads the Polyak-averaged (EMA) weights by default
and streams the eval shards through the loader's evaluation mode (center crop, every image once across ranks,
padding masked). Scores never materialise as an (N, C) matrix: `MapAtK` keeps a running top-K per class, so 100k
images x 17k classes fit in memory. With several workers each scores its share and returns `MapAtK.state_dict()`;
the driver merges them, and `MapAtK` refuses an image id seen twice, so every eval image is counted exactly once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.cluster import connect_ray
from pipeline.config import Config, StorageConfig, validate
from pipeline.data import ShardStream, read_manifest, to_device
from pipeline.data.manifest import check_same_classes
from pipeline.evaluation.baselines import BaselineScorers, baseline_key, class_prior, read_cached, write_cached
from pipeline.evaluation.metrics import MapAtK, MapAtKResult, load_class_weights
from pipeline.models import build_model, preprocess_input
from pipeline.storage import read_bytes
from pipeline.storage.checkpoints import read_checkpoint_config, read_checkpoint_state, read_commit

log = logging.getLogger(__name__)

EXAMPLES = 8  # images kept (with their top predictions) for the report
# Data settings of the machine that evaluates (it may have more cores than a training worker), not of the model.
EVALUATOR_DATA = ("loader_workers", "cache_dir", "cache_max_gb")


@dataclass
class Scored:
    """One worker's share of an evaluation: the metric accumulator plus a few examples for the report."""

    accumulator: MapAtK
    examples: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    baselines: BaselineScorers | None = None  # the same images scored without looking at them


def checkpoint_config(checkpoint_url: str, storage: StorageConfig | None) -> Config:
    """The resolved config saved beside a checkpoint."""
    return read_checkpoint_config(checkpoint_url, storage)


def resolve_config(saved: Config, settings: Config | None) -> Config:
    """The config an evaluation runs with: model and data from the checkpoint's `saved` config; `eval.*`, `storage`,
    `cluster.use_gpu`/`address`, `EVALUATOR_DATA` and (when set) `data.eval` from the evaluator's `settings`.

    Without `settings`, the saved config as it is.
    """
    if settings is None:
        return saved
    raw, own = saved.model_dump(mode="json"), settings.model_dump(mode="json")
    raw["eval"], raw["storage"] = own["eval"], own["storage"]
    for key in ("use_gpu", "address"):
        raw["cluster"][key] = own["cluster"][key]
    for key in EVALUATOR_DATA + (("eval",) if settings.data.eval else ()):
        raw["data"][key] = own["data"][key]
    return validate(raw)


def eval_settings(config: Config) -> dict[str, Any]:
    """What a MAP number depends on besides the checkpoint and the eval data; recorded with every evaluation."""
    return {"k": config.eval.k, "class_weights": config.eval.class_weights, "weights": config.eval.weights}


def ray_options(config: Config) -> dict[str, Any]:
    """What the evaluator actor and each scoring task ask Ray for: 1 CPU, 1 GPU with `cluster.use_gpu`, and the
    custom `eval.resources` (e.g. {"evaluator": 1}, which only the evaluator node type offers in infra/)."""
    return {"num_cpus": 1, "num_gpus": 1 if config.cluster.use_gpu else 0, "resources": dict(config.eval.resources)}


def load_weights(checkpoint_url: str, config: Config, device: torch.device) -> torch.nn.Module:
    """The trained model in eval mode, with EMA (`eval.weights=ema`) or raw weights."""
    state = read_checkpoint_state(checkpoint_url, config.storage, map_location=device)
    model = build_model(config).to(device)
    if config.eval.weights == "ema":
        if state.get("ema") is None:
            raise ValueError(f"{checkpoint_url} has no EMA weights (train.ema_decay was null); use eval.weights=raw")
        model.load_state_dict(state["ema"]["shadow"])
    else:
        model.load_state_dict(state["model"])
    return model.eval()


def score_share(model: torch.nn.Module, config: Config, *, rank: int = 0, world_size: int = 1,
                device: torch.device | None = None, baselines: bool = False) -> Scored:
    """Stream this rank's share of `data.eval` through `model` into a `MapAtK` accumulator, decoding with
    `data.loader_workers` processes; with `baselines`, also score the same images with `BaselineScorers`."""
    device = device or torch.device("cpu")
    eval_prefix, storage = _eval_prefix(config), config.storage
    manifest = read_manifest(eval_prefix, storage)
    num_classes = config.model.num_classes
    if manifest.num_classes != num_classes:
        raise ValueError(f"eval data at {eval_prefix} has {manifest.num_classes} classes, the model {num_classes}")
    loader = ShardStream(eval_prefix, config.data, batch_size=config.eval.batch_size, rank=rank,
                         world_size=world_size, train=False, storage=storage, num_classes=num_classes,
                         manifest=manifest)
    scored = Scored(MapAtK(num_classes, config.eval.k),
                    baselines=BaselineScorers.for_prior(class_prior(config), config.eval.k) if baselines else None)
    limit = config.eval.max_images
    with torch.inference_mode():
        for batch in loader:
            pixels, targets = to_device(batch, device, num_classes)
            images = preprocess_input(pixels)
            valid = batch.valid.to(device)
            if not bool(valid.any()):
                continue
            logits = model(images).float()
            keep = valid.nonzero().squeeze(1)
            ids = batch.sample_ids.to(device)[keep]  # dataset-wide indices: distinct across ranks
            if limit is not None:
                keep, ids = keep[ids < limit], ids[ids < limit]
            if keep.numel():
                scored.accumulator.update(logits[keep], targets[keep], ids)
                if scored.baselines is not None:
                    scored.baselines.update(targets[keep], ids)
                scored.images += int(keep.numel())
                _keep_examples(scored, batch, logits, targets, keep)
    return scored


def _keep_examples(scored: Scored, batch: Any, logits: torch.Tensor, targets: torch.Tensor,
                   keep: torch.Tensor) -> None:
    for i in keep.tolist():
        if len(scored.examples) >= EXAMPLES:
            return
        top = logits[i].topk(min(5, logits.shape[1]))
        scored.examples.append({
            "key": batch.keys[i], "image": batch.images[i].permute(1, 2, 0).cpu().numpy(),
            "top": list(zip(top.indices.tolist(), torch.sigmoid(top.values).tolist(), strict=True)),
            "labels": targets[i].nonzero().squeeze(1).tolist(),
        })


def _eval_prefix(config: Config) -> str:
    if config.data.eval is None:
        raise ValueError("no evaluation data: set data.eval to the URL of a densely labelled dataset prefix")
    return config.data.eval


def class_weights(config: Config) -> torch.Tensor | None:
    """Per-class MAP weights from `eval.class_weights`: uniform (None), training frequency, or a CSV file."""
    source, storage = config.eval.class_weights, config.storage
    if source == "uniform":
        return None
    if source == "train_frequency":
        return class_prior(config)
    text = read_bytes(source, storage).decode("utf-8")
    return load_class_weights(text.splitlines(), config.model.num_classes)


@dataclass
class Evaluation:
    """The outcome of evaluating one checkpoint."""

    step: int
    samples_seen: int | None
    checkpoint: str
    result: MapAtKResult
    examples: list[dict[str, Any]]
    seconds: float
    config: Config  # what it ran with (`resolve_config`)
    baselines: dict[str, dict[str, float]] | None = None  # `BaselineScorers.compute()` on the same eval set

    def record(self) -> dict[str, Any]:
        """The JSON line appended to `reports/map100.jsonl`, naming k, the class weighting and EMA/raw weights,
        with the random and class-prior scores of the same evaluation set under "baselines"."""
        return {"step": self.step, "samples_seen": self.samples_seen, "checkpoint": self.checkpoint,
                **eval_settings(self.config), **self.result.scalars(), "baselines": self.baselines,
                "eval_seconds": round(self.seconds, 3), "time": time.time()}


def evaluate_checkpoint(checkpoint_url: str, settings: Config | None = None, *, device: torch.device | None = None,
                        workers: int = 1, reports_dir: str | None = None) -> Evaluation:
    """Evaluate one complete checkpoint with the evaluator's `settings` (see `resolve_config`; None: the saved
    config alone); `workers` > 1 scores shares in parallel Ray tasks and merges them.

    The random and class-prior baselines come from `reports_dir`'s cache when it has them for this evaluation
    set, else they are computed in the same pass (and cached there when `reports_dir` is given)."""
    start = time.perf_counter()
    config = resolve_config(checkpoint_config(checkpoint_url, settings.storage if settings else None), settings)
    commit = read_commit(checkpoint_url, config.storage)
    check_same_classes(commit.get("class_fingerprint"), _eval_prefix(config), config.storage)  # before loading anything
    key = baseline_key(config) if reports_dir else None
    baselines = read_cached(reports_dir, key, config.storage) if reports_dir and key else None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if workers > 1:
        shares = _score_with_ray(checkpoint_url, config, workers, baselines is None)
    else:
        model = load_weights(checkpoint_url, config, device)
        shares = [score_share(model, config, device=device, baselines=baselines is None)]
    first = shares[0]
    accumulator, examples = first.accumulator, list(first.examples)
    for share in shares[1:]:
        accumulator.merge(share.accumulator)
        examples += share.examples
        if first.baselines is not None and share.baselines is not None:
            first.baselines.merge(share.baselines)
    weights = class_weights(config)
    result = accumulator.compute(weights)
    if baselines is None and first.baselines is not None:
        baselines = first.baselines.compute(weights)
        if reports_dir and key is not None:
            write_cached(reports_dir, key, baselines, config.storage)
    return Evaluation(step=int(commit.get("step", -1)), samples_seen=commit.get("samples_seen"),
                      checkpoint=checkpoint_url, result=result, examples=examples[:EXAMPLES],
                      seconds=time.perf_counter() - start, config=config, baselines=baselines)


def _score_remote(checkpoint_url: str, raw_config: dict, rank: int, world_size: int,
                  baselines: bool) -> tuple[dict, list, int, dict | None]:
    config = validate(raw_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_weights(checkpoint_url, config, device)
    scored = score_share(model, config, rank=rank, world_size=world_size, device=device, baselines=baselines)
    return (scored.accumulator.state_dict(), scored.examples, scored.images,
            scored.baselines.state_dict() if scored.baselines is not None else None)


def _score_with_ray(checkpoint_url: str, config: Config, workers: int, baselines: bool) -> list[Scored]:
    import ray

    connect_ray(config)
    remote = ray.remote(**ray_options(config))(_score_remote)
    futures = [remote.remote(checkpoint_url, config.model_dump(mode="json"), rank, workers, baselines)
               for rank in range(workers)]
    shares = []
    for state, examples, images, baseline_state in ray.get(futures):
        scorers = BaselineScorers.from_state_dict(baseline_state) if baseline_state is not None else None
        shares.append(Scored(MapAtK.from_state_dict(state), examples, images, scorers))
    return shares
