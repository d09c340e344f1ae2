"""Score a checkpoint on the dense evaluation set: MAP@K and companions, one streaming pass.

A checkpoint carries its own resolved config (`config.yaml`), so the evaluator rebuilds exactly the model that
was trained, loads the Polyak-averaged (EMA) weights by default, and streams the eval shards through the loader's
evaluation mode (center crop, every image once across ranks, padding masked). Scores never materialise as an
(N, C) matrix: `MapAtK` keeps a running top-K per class, so 100k images x 17k classes fit in memory. With several
workers each scores its share and returns `MapAtK.state_dict()`; the driver merges them, and `MapAtK` refuses an
image id seen twice, so every eval image is counted exactly once.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from pipeline.config import Config, StorageConfig, validate
from pipeline.data import ShardStream, read_manifest, to_device
from pipeline.data.manifest import read_classes
from pipeline.evaluation.metrics import MapAtK, MapAtKResult, load_class_weights
from pipeline.models import build_model
from pipeline.storage import join_url, read_bytes

log = logging.getLogger(__name__)

EXAMPLES = 8  # images kept (with their top predictions) for the report


@dataclass
class Scored:
    """One worker's share of an evaluation: the metric accumulator plus a few examples for the report."""

    accumulator: MapAtK
    examples: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0


def checkpoint_config(checkpoint_url: str, storage: StorageConfig | None) -> Config:
    """The resolved config saved beside a checkpoint."""
    return validate(yaml.safe_load(read_bytes(join_url(checkpoint_url, "config.yaml"), storage)))


def load_weights(checkpoint_url: str, config: Config, weights: str, storage: StorageConfig | None,
                 device: torch.device) -> torch.nn.Module:
    """The trained model in eval mode, with EMA (`weights="ema"`) or raw weights."""
    state = torch.load(io.BytesIO(read_bytes(join_url(checkpoint_url, "state.pt"), storage)), map_location=device,
                       weights_only=True)
    model = build_model(config).to(device)
    if weights == "ema":
        if state.get("ema") is None:
            raise ValueError(f"{checkpoint_url} has no EMA weights (train.ema_decay was null); use eval.weights=raw")
        model.load_state_dict(state["ema"]["shadow"])
    else:
        model.load_state_dict(state["model"])
    return model.eval()


def score_share(model: torch.nn.Module, config: Config, eval_prefix: str, *, rank: int = 0, world_size: int = 1,
                device: torch.device | None = None, storage: StorageConfig | None = None) -> Scored:
    """Stream this rank's share of the eval set through `model` into a `MapAtK` accumulator."""
    device = device or torch.device("cpu")
    manifest = read_manifest(eval_prefix, storage)
    num_classes = config.model.num_classes
    if manifest.num_classes != num_classes:
        raise ValueError(f"eval data at {eval_prefix} has {manifest.num_classes} classes, the model {num_classes}")
    loader = ShardStream(eval_prefix, config.data.model_copy(update={"loader_workers": 1}),
                         batch_size=config.eval.batch_size, rank=rank, world_size=world_size, train=False,
                         storage=storage, num_classes=num_classes, manifest=manifest)
    scored = Scored(MapAtK(num_classes, config.eval.k))
    limit = config.eval.max_images
    with torch.inference_mode():
        for batch in loader:
            images, targets = to_device(batch, device, num_classes)
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


def class_weights(config: Config, storage: StorageConfig | None) -> torch.Tensor | None:
    """Per-class MAP weights from `eval.class_weights`: uniform (None), training frequency, or a CSV file."""
    source = config.eval.class_weights
    if source == "uniform":
        return None
    if source == "train_frequency":
        prefix = config.data.train or config.data.eval
        classes = read_classes(prefix, read_manifest(prefix, storage), storage)
        return torch.tensor([float(c.train_frequency) for c in classes], dtype=torch.float64)
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

    def record(self) -> dict[str, Any]:
        """The JSON line appended to `reports/map100.jsonl`."""
        return {"step": self.step, "samples_seen": self.samples_seen, "checkpoint": self.checkpoint,
                **self.result.scalars(), "eval_seconds": round(self.seconds, 3), "time": time.time()}


def evaluate_checkpoint(checkpoint_url: str, eval_prefix: str | None = None, *, weights: str | None = None,
                        storage: StorageConfig | None = None, device: torch.device | None = None,
                        workers: int = 1, overrides: Config | None = None) -> Evaluation:
    """Evaluate one complete checkpoint; `workers` > 1 scores shares in parallel Ray tasks and merges them."""
    start = time.perf_counter()
    config = overrides or checkpoint_config(checkpoint_url, storage)
    eval_prefix = eval_prefix or config.data.eval
    if eval_prefix is None:
        raise ValueError("no evaluation data: set data.eval to the URL of a densely labelled dataset prefix")
    weights = weights or config.eval.weights
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if workers > 1:
        shares = _score_with_ray(checkpoint_url, config, eval_prefix, weights, storage, workers)
    else:
        model = load_weights(checkpoint_url, config, weights, storage, device)
        shares = [score_share(model, config, eval_prefix, device=device, storage=storage)]
    accumulator, examples = shares[0].accumulator, list(shares[0].examples)
    for share in shares[1:]:
        accumulator.merge(share.accumulator)
        examples += share.examples
    result = accumulator.compute(class_weights(config, storage))
    commit = _commit(checkpoint_url, storage)
    return Evaluation(step=int(commit.get("step", -1)), samples_seen=commit.get("samples_seen"),
                      checkpoint=checkpoint_url, result=result, examples=examples[:EXAMPLES],
                      seconds=time.perf_counter() - start)


def _commit(checkpoint_url: str, storage: StorageConfig | None) -> dict[str, Any]:
    import json

    return json.loads(read_bytes(join_url(checkpoint_url, "COMMIT"), storage))


def _score_remote(checkpoint_url: str, raw_config: dict, eval_prefix: str, weights: str,
                  storage: StorageConfig | None, rank: int, world_size: int) -> tuple[dict, list, int]:
    config = validate(raw_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_weights(checkpoint_url, config, weights, storage, device)
    scored = score_share(model, config, eval_prefix, rank=rank, world_size=world_size, device=device,
                         storage=storage)
    return scored.accumulator.state_dict(), scored.examples, scored.images


def _score_with_ray(checkpoint_url: str, config: Config, eval_prefix: str, weights: str,
                    storage: StorageConfig | None, workers: int) -> list[Scored]:
    import ray

    if not ray.is_initialized():
        ray.init(address=config.cluster.address)
    gpus = 1 if config.cluster.use_gpu else 0
    remote = ray.remote(num_cpus=1, num_gpus=gpus)(_score_remote)
    futures = [remote.remote(checkpoint_url, config.model_dump(mode="json"), eval_prefix, weights, storage, rank,
                             workers) for rank in range(workers)]
    shares = []
    for state, examples, images in ray.get(futures):
        shares.append(Scored(MapAtK.from_state_dict(state), examples, images))
    return shares
