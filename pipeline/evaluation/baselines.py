"""Scorers that never look at the image: the numbers a trained model's MAP@K has to beat.

- `random`: every (image, class) pair gets an independent uniform score, drawn from a generator seeded by the
  image id, so shares scored by several workers give exactly what one process gives.
- `prior`: every image gets each class's training frequency. In the per-image orientation this ranks the common
  classes first for every image, which is a strong score on long-tailed labels; in the per-class (paper)
  orientation all images tie and are ranked by id, which scores like `random`.

A model that scores near `prior` has learned the label frequencies, not the images. The evaluator computes both
once per evaluation set (alongside its first pass over the images: they need only the labels) and caches them in
`reports/baselines.json`, keyed by everything that changes them (`baseline_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import Tensor

from pipeline.config import Config, StorageConfig
from pipeline.data.format import MANIFEST_FILE, read_manifest
from pipeline.evaluation.class_weights import frequency_source
from pipeline.evaluation.frequency_thirds import FrequencyThirds
from pipeline.evaluation.map_metric import MeanAveragePrecisionAtK
from pipeline.storage import exists, join_url, read_bytes, write_bytes

log = logging.getLogger(__name__)

BASELINES = ("random", "prior")
CACHE_FILE = "baselines.json"
_RANDOM_SEED = 0x5EED


def random_scores(image_ids: Tensor, num_classes: int) -> Tensor:
    """(B, C) uniform scores, row i a pure function of image_ids[i]."""
    rows = [torch.rand(num_classes, generator=torch.Generator().manual_seed(_RANDOM_SEED + int(i)))
            for i in image_ids.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, num_classes)


class BaselineScorers:
    """One `MeanAveragePrecisionAtK` per baseline, fed the same targets and image ids as the model's metric.

    `for_prior` makes scorers that score batches; `from_state_dict` rebuilds a worker's scorers on the driver,
    which only merges and computes them (it has no prior to score with, and needs none)."""

    def __init__(self, metrics: dict[str, MeanAveragePrecisionAtK], prior: Tensor | None = None) -> None:
        self.metrics = metrics
        self.prior = prior

    @classmethod
    def for_prior(cls, prior: Tensor, k: int) -> BaselineScorers:
        return cls({name: MeanAveragePrecisionAtK(prior.numel(), k) for name in BASELINES}, prior.to(torch.float32))

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BaselineScorers:
        """Scorers around a share's metrics (taken over, not copied)."""
        return cls({name: state[name] for name in BASELINES})

    def update(self, targets: Tensor, image_ids: Tensor) -> None:
        if self.prior is None:
            raise ValueError("these baseline scorers were rebuilt from a state: they merge and compute, not score")
        targets, image_ids = targets.cpu(), image_ids.cpu()
        n = targets.shape[0]
        self.metrics["random"].update(random_scores(image_ids, self.prior.numel()), targets, image_ids)
        self.metrics["prior"].update(self.prior.expand(n, -1), targets, image_ids)

    def state_dict(self) -> dict[str, Any]:
        """The metrics themselves (picklable torchmetrics metrics, merged with `merge_state`)."""
        return dict(self.metrics)

    def merge(self, other: BaselineScorers | dict[str, Any]) -> BaselineScorers:
        """Fold another share's scorers (or their state_dict) over disjoint image ids into these; returns self."""
        states = other if isinstance(other, dict) else other.state_dict()
        for name, metric in self.metrics.items():
            metric.merge_state(states[name])
        return self

    def compute(self, weights: Tensor | None,
                thirds: FrequencyThirds | None = None) -> dict[str, dict[str, float | None]]:
        """{"random": {"map@K": ..., "image_map@K": ...}, "prior": {...}}, with `thirds` also each third's
        "<third>_map@K" (`pipeline.evaluation.frequency_thirds`)."""
        out: dict[str, dict[str, float | None]] = {}
        for name, metric in self.metrics.items():
            result = metric.result(weights)
            scalars = result.scalars()
            out[name] = {key: scalars[key] for key in (f"map@{metric.k}", f"image_map@{metric.k}")}
            if thirds is not None:
                out[name].update(thirds.maps(result.per_class_ap, result.class_valid, weights, metric.k))
        return out


def baseline_key(config: Config) -> dict[str, Any]:
    """What the baselines depend on: the eval set (URL and a digest of its manifest), the training frequencies'
    source, K, the class weighting and the image limit; with `eval.class_weights=classes_file` also a digest of the
    eval set's classes.tsv, which holds the weights."""
    storage = config.storage
    eval_prefix = config.data.eval
    if eval_prefix is None:
        raise ValueError("no evaluation data: set data.eval")
    key = {"eval": eval_prefix, "eval_manifest_sha256": _digest(join_url(eval_prefix, MANIFEST_FILE), storage),
           "prior_from": frequency_source(config), "k": config.eval.k, "class_weights": config.eval.class_weights,
           "max_images": config.eval.max_images, "frequency_thirds": 1}  # 1: the thirds' MAPs are in the entry
    if config.eval.class_weights == "classes_file":
        classes = join_url(eval_prefix, read_manifest(eval_prefix, storage).classes)
        key["eval_classes_sha256"] = _digest(classes, storage)
    return key


def _digest(url: str, storage: StorageConfig | None) -> str:
    return hashlib.sha256(read_bytes(url, storage)).hexdigest()[:16]


def _cached_entries(url: str, storage: StorageConfig | None) -> list[dict[str, Any]]:
    """The cache file's entries; none when it is missing or unreadable (the baselines are then computed again)."""
    if not exists(url, storage):
        return []
    try:
        return json.loads(read_bytes(url, storage))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; the baselines are computed again", url)
        return []


def read_cached(reports_dir: str, key: dict[str, Any], storage: StorageConfig | None) -> dict | None:
    """The cached baselines for `key`, or None."""
    entries = _cached_entries(join_url(reports_dir, CACHE_FILE), storage)
    return next((entry["baselines"] for entry in entries if entry.get("key") == key), None)


def write_cached(reports_dir: str, key: dict[str, Any], baselines: dict, storage: StorageConfig | None) -> None:
    """Add (or replace) the entry for `key`, keeping the other keys' entries."""
    url = join_url(reports_dir, CACHE_FILE)
    entries = [e for e in _cached_entries(url, storage) if e.get("key") != key]
    entries.append({"key": key, "baselines": baselines})
    write_bytes(url, json.dumps(entries, indent=1).encode("utf-8"), storage)
