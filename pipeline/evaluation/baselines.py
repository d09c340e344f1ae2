"""Scorers that never look at the image: the numbers a trained model's MAP@K has to beat.

- `random`: every (image, class) pair gets an independent uniform score, drawn from a generator seeded by the
  image id, so shares scored by several workers give exactly what one process gives.
- `prior`: every image gets each class's training frequency. In the per-image orientation this ranks the common
  classes first for every image, which is a strong score on long-tailed labels; in the per-class (paper)
  orientation all images tie and are ranked by id, which scores like `random`.

A model that scores near `prior` has learned the label frequencies, not the images. The evaluator computes both
once per evaluation set (alongside its first pass over the images: they need only the labels) and caches them in
`reports/baselines.json`, keyed by everything that changes them (`BaselineKey`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from torch import Tensor

from pipeline.config import Config, StorageConfig
from pipeline.data import read_manifest
from pipeline.data.manifest import MANIFEST_FILE, read_classes
from pipeline.evaluation.metrics import MapAtK
from pipeline.storage import exists, join_url, read_bytes, write_bytes

log = logging.getLogger(__name__)

BASELINES = ("random", "prior")
CACHE_FILE = "baselines.json"
_RANDOM_SEED = 0x5EED


def class_prior(config: Config) -> Tensor:
    """Each class's training frequency (from the training classes file; the eval set's copy when training data
    is not known), float64 (C,)."""
    prefix = config.data.train or config.data.eval
    if prefix is None:
        raise ValueError("the class-prior baseline needs data.train or data.eval (their classes.tsv)")
    classes = read_classes(prefix, read_manifest(prefix, config.storage), config.storage)
    return torch.tensor([float(c.train_frequency) for c in classes], dtype=torch.float64)


def random_scores(image_ids: Tensor, num_classes: int) -> Tensor:
    """(B, C) uniform scores, row i a pure function of image_ids[i]."""
    rows = [torch.rand(num_classes, generator=torch.Generator().manual_seed(_RANDOM_SEED + int(i)))
            for i in image_ids.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, num_classes)


class BaselineScorers:
    """One `MapAtK` per baseline, fed the same targets and image ids as the model's accumulator."""

    def __init__(self, prior: Tensor, k: int) -> None:
        self.prior = prior.to(torch.float32)
        self.k = k
        self.accumulators = {name: MapAtK(prior.numel(), k) for name in BASELINES}

    def update(self, targets: Tensor, image_ids: Tensor) -> None:
        targets, image_ids = targets.cpu(), image_ids.cpu()
        n = targets.shape[0]
        self.accumulators["random"].update(random_scores(image_ids, self.prior.numel()), targets, image_ids)
        self.accumulators["prior"].update(self.prior.expand(n, -1), targets, image_ids)

    def state_dict(self) -> dict[str, Any]:
        return {name: acc.state_dict() for name, acc in self.accumulators.items()}

    def merge(self, state: dict[str, Any]) -> None:
        for name, acc in self.accumulators.items():
            acc.merge(state[name])

    def compute(self, weights: Tensor | None) -> dict[str, dict[str, float]]:
        """{"random": {"map@K": ..., "image_map@K": ...}, "prior": {...}}."""
        out = {}
        for name, acc in self.accumulators.items():
            scalars = acc.compute(weights).scalars()
            out[name] = {key: scalars[key] for key in (f"map@{self.k}", f"image_map@{self.k}")}
        return out


def baseline_key(config: Config) -> dict[str, Any]:
    """What the baselines depend on: the eval set (URL and a digest of its manifest), the training frequencies'
    source, K, the class weighting and the image limit."""
    storage = config.storage
    eval_prefix = config.data.eval
    if eval_prefix is None:
        raise ValueError("no evaluation data: set data.eval")
    digest = hashlib.sha256(read_bytes(join_url(eval_prefix, MANIFEST_FILE), storage)).hexdigest()[:16]
    return {"eval": eval_prefix, "eval_manifest_sha256": digest, "prior_from": config.data.train or eval_prefix,
            "k": config.eval.k, "class_weights": config.eval.class_weights, "max_images": config.eval.max_images}


def read_cached(reports_dir: str, key: dict[str, Any], storage: StorageConfig | None) -> dict | None:
    """The cached baselines for `key`, or None (also when the cache is unreadable: it is recomputed)."""
    url = join_url(reports_dir, CACHE_FILE)
    if not exists(url, storage):
        return None
    try:
        entries = json.loads(read_bytes(url, storage))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; the baselines are computed again", url)
        return None
    return next((entry["baselines"] for entry in entries if entry.get("key") == key), None)


def write_cached(reports_dir: str, key: dict[str, Any], baselines: dict, storage: StorageConfig | None) -> None:
    url = join_url(reports_dir, CACHE_FILE)
    entries = []
    if exists(url, storage):
        try:
            entries = [e for e in json.loads(read_bytes(url, storage)) if e.get("key") != key]
        except (json.JSONDecodeError, UnicodeDecodeError):
            entries = []
    entries.append({"key": key, "baselines": baselines})
    write_bytes(url, json.dumps(entries, indent=1).encode("utf-8"), storage)
