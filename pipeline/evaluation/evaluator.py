"""Score a checkpoint on the dense evaluation set: MAP@K and companions, one streaming pass.

A checkpoint carries its own resolved config (`config.yaml`): what the checkpoint *is* (model, image size, training
data and classes) comes from it, so the evaluator rebuilds exactly the model that was trained; how to *evaluate*
it (`eval.*`, `storage`, `cluster.use_gpu`, the loader settings of the evaluating machine, `data.eval` when set)
comes from the evaluator's own config (`resolve_config`). It loads the Polyak-averaged (EMA) weights by default
and streams the eval shards through the loader's evaluation mode (center crop, every image once across ranks,
padding masked). Scores never materialise as an (N, C) matrix: `MeanAveragePrecisionAtK` (a torchmetrics `Metric`)
keeps a running top-K per class, so 100k images x 17k classes fit in memory. The scoring loop feeds a dict of metric
units (`pipeline.evaluation.units`: MAP@K, the baselines, the report's examples, the decision thresholds). With
several workers each scores its share and returns its units' `state_dict()`s; the driver merges them (torchmetrics'
`merge_state` for the MAP metrics), and the metric refuses an image id seen twice, so every eval image is counted
exactly once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.checkpoint.format import read_checkpoint_config, read_commit, read_weights
from pipeline.cluster import connect_ray
from pipeline.config import Config, StorageConfig, validate
from pipeline.data.format import check_same_classes, read_manifest
from pipeline.data.loading import ShardStream, to_device
from pipeline.evaluation.baselines import baseline_key, read_cached, write_cached
from pipeline.evaluation.class_weights import class_prior, class_weights
from pipeline.evaluation.frequency_thirds import FrequencyThirds
from pipeline.evaluation.map_at_k import MapAtKResult
from pipeline.evaluation.threshold_fit import ThresholdFit
from pipeline.evaluation.units import MetricUnit, merged_units, metric_units
from pipeline.models import build_model, preprocess_input

log = logging.getLogger(__name__)

# Data settings of the machine that evaluates (it may have more cores than a training worker), not of the model.
EVALUATOR_DATA = ("loader_workers", "cache_dir", "cache_max_gb")


def checkpoint_config(checkpoint_url: str, storage: StorageConfig | None) -> Config:
    """The resolved config saved beside a checkpoint."""
    return read_checkpoint_config(checkpoint_url, storage)


def resolve_config(saved: Config, settings: Config | None) -> Config:
    """The config an evaluation runs with: model and data from the checkpoint's `saved` config; `eval.*`, `storage`,
    `cluster.use_gpu`/`address`, `EVALUATOR_DATA` and (when set) `data.eval` from the evaluator's `settings`;
    `tracking` from the evaluator's when it names a backend, else the training's (so the evaluator reports into
    the tracked run that training logs to without repeating its settings).

    Without `settings`, the saved config as it is.
    """
    if settings is None:
        return saved
    raw, own = saved.model_dump(mode="json"), settings.model_dump(mode="json")
    raw["eval"], raw["storage"] = own["eval"], own["storage"]
    if settings.tracking.backend != "none":
        raw["tracking"] = own["tracking"]
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
    """The trained model in eval mode, with EMA (`eval.weights=ema`) or raw weights (`pipeline.checkpoint`'s policy:
    EMA asked for and none kept is refused)."""
    weights = read_weights(checkpoint_url, config.eval.weights, config.storage, map_location=device)
    model = build_model(config).to(device)
    model.load_state_dict(weights)
    return model.eval()


def score_share(model: torch.nn.Module, config: Config, units: dict[str, MetricUnit], *, rank: int = 0,
                world_size: int = 1, device: torch.device | None = None) -> None:
    """Stream this rank's share of `data.eval` through `model` into every metric unit, decoding with
    `data.loader_workers` processes."""
    device = device or torch.device("cpu")
    eval_prefix, storage = _eval_prefix(config), config.storage
    manifest = read_manifest(eval_prefix, storage)
    num_classes = config.model.num_classes
    if manifest.num_classes != num_classes:
        raise ValueError(f"eval data at {eval_prefix} has {manifest.num_classes} classes, the model {num_classes}")
    loader = ShardStream(eval_prefix, config.data, batch_size=config.eval.batch_size, rank=rank,
                         world_size=world_size, train=False, storage=storage, num_classes=num_classes,
                         manifest=manifest)
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
                scored, labelled = logits[keep], targets[keep]
                for unit in units.values():
                    unit.update(scored, labelled, ids, batch, keep)


def _eval_prefix(config: Config) -> str:
    if config.data.eval is None:
        raise ValueError("no evaluation data: set data.eval to the URL of a densely labelled dataset prefix")
    return config.data.eval


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
    thresholds: ThresholdFit | None = None  # per-class max-F1 decision thresholds on the same eval set
    by_frequency: dict[str, Any] | None = None  # `FrequencyThirds.scalars`: MAP@K of the head, middle, tail thirds

    def record(self) -> dict[str, Any]:
        """The JSON line appended to `reports/map100.jsonl`, naming k, the class weighting and EMA/raw weights,
        with MAP@K of the head, middle and tail thirds of the classes by training frequency ("head_map@K", ...,
        their sizes, and their frequency ranges under "frequency_thirds"), the random and class-prior scores of the
        same evaluation set under "baselines", and the mean F1 over classes at their decision thresholds: held out
        ("threshold_mean_f1": thresholds fitted on one half of the images, scored on the other) and in-sample
        ("threshold_mean_f1_in_sample": fitted and scored on all, optimistic; the thresholds written for prediction
        are these)."""
        fit = self.thresholds
        return {"step": self.step, "samples_seen": self.samples_seen, "checkpoint": self.checkpoint,
                **eval_settings(self.config), **self.result.scalars(), **(self.by_frequency or {}),
                "baselines": self.baselines,
                "threshold_mean_f1": fit.mean_held_out_f1() if fit is not None else None,
                "threshold_mean_f1_in_sample": fit.mean_f1() if fit is not None else None,
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
    cached = read_cached(reports_dir, key, config.storage) if reports_dir and key else None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if workers > 1:
        units = merged_units(_score_with_ray(checkpoint_url, config, workers, cached is None))
    else:
        units = metric_units(config, baselines=cached is None)
        score_share(load_weights(checkpoint_url, config, device), config, units, device=device)
    weights, thirds = class_weights(config), FrequencyThirds.of(class_prior(config))
    values: dict[str, Any] = {"baselines": cached}
    for unit in units.values():
        values.update(unit.compute(weights, thirds))
    if cached is None and reports_dir and key is not None:
        write_cached(reports_dir, key, values["baselines"], config.storage)
    result = values["result"]
    by_frequency = thirds.scalars(result.per_class_ap, result.class_valid, weights, result.k)
    return Evaluation(step=int(commit.get("step", -1)), samples_seen=commit.get("samples_seen"),
                      checkpoint=checkpoint_url, seconds=time.perf_counter() - start, config=config,
                      by_frequency=by_frequency, **values)


def _score_remote(checkpoint_url: str, raw_config: dict, rank: int, world_size: int,
                  baselines: bool) -> dict[str, dict[str, Any]]:
    config = validate(raw_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    units = metric_units(config, baselines)
    score_share(load_weights(checkpoint_url, config, device), config, units, rank=rank, world_size=world_size,
                device=device)
    return {name: unit.state_dict() for name, unit in units.items()}


def _score_with_ray(checkpoint_url: str, config: Config, workers: int, baselines: bool) -> list[dict[str, dict]]:
    """Each share's unit states, in rank order."""
    import ray

    connect_ray(config)
    remote = ray.remote(**ray_options(config))(_score_remote)
    futures = [remote.remote(checkpoint_url, config.model_dump(mode="json"), rank, workers, baselines)
               for rank in range(workers)]
    return ray.get(futures)
