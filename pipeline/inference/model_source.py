"""Where a prediction's model comes from: `load_predictor(source)` -> what to decode, what to run, what to call it.

A source is resolved once on the driver into a `Predictor`: light, picklable, shipped to every Ray Data replica,
which then builds the model with its weights once (`Predictor.build`). Sources today:

- a run directory (`<run.storage>/<run.name>`): its latest complete checkpoint;
- a checkpoint URL (`<run>/checkpoints/step-NNNNNNNNN`).

Either way the model is the checkpoint's saved config (architecture, `data.image_size`, the eval crop
`data.augment.eval_crop_fraction`, `data.decoder`) with its Polyak-averaged (EMA) weights (or the raw ones);
the class names come from the training classes file the checkpoint's COMMIT names (else `data.train`'s
classes.tsv); the decision thresholds from `<run>/reports/thresholds/step-NNNNNNNNN.json`, the evaluator's for that
step, if it has evaluated it. Another source (an exported model package) is one more branch in `load_predictor`
returning a `Predictor` with its own `loader`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import AugmentConfig, Config, StorageConfig
from pipeline.data.manifest import read_classes, read_manifest, read_vocabulary
from pipeline.models import build_model
from pipeline.models.thresholds import ClassThresholds, read_thresholds, thresholds_url
from pipeline.storage import StorageError, exists, join_url
from pipeline.storage.checkpoints import (
    COMMIT,
    latest_checkpoint,
    read_checkpoint_config,
    read_checkpoint_state,
    read_commit,
)

log = logging.getLogger(__name__)

ModelLoader = Callable[[torch.device], torch.nn.Module]  # picklable: it travels to every replica


@dataclass(frozen=True)
class Predictor:
    """A model to predict with, before its weights are loaded: how to decode, which classes, which thresholds."""

    source: str  # what was asked for
    weights_url: str  # where the weights are (a checkpoint URL)
    step: int | None
    classes: list[str]
    thresholds: ClassThresholds | None  # None: no evaluated thresholds; predictions carry no labels
    image_size: int
    augment: AugmentConfig  # only eval_crop_fraction is used: prediction decodes like evaluation
    decoder: str
    loader: ModelLoader

    def build(self, device: torch.device) -> torch.nn.Module:
        """The model with its weights, in eval mode, on `device`."""
        return self.loader(device).eval()


def load_predictor(source: str, storage: StorageConfig | None = None, weights: str = "ema") -> Predictor:
    """The `Predictor` of a run directory (its latest complete checkpoint) or of one checkpoint URL."""
    checkpoint = source.rstrip("/")
    if not exists(join_url(checkpoint, COMMIT), storage):
        latest = latest_checkpoint(checkpoint, storage)
        if latest is None:
            raise ValueError(f"predict.model={source}: neither a complete checkpoint (no {COMMIT}) nor a run "
                             "directory with one under checkpoints/")
        checkpoint = latest.url
    return _from_checkpoint(source, checkpoint, storage, weights)


def _from_checkpoint(source: str, checkpoint: str, storage: StorageConfig | None, weights: str) -> Predictor:
    saved = read_checkpoint_config(checkpoint, storage)
    commit = read_commit(checkpoint, storage)
    step = commit.get("step")
    classes = _class_names(saved, commit, storage)
    thresholds = _thresholds(checkpoint, step, classes, storage)
    loader = functools.partial(_load_checkpoint_model, checkpoint, saved.model_dump(mode="json"), storage, weights)
    log.info("predicting with %s (step %s, %s weights, %d classes, %s)", checkpoint, step, weights, len(classes),
             "per-class thresholds" if thresholds else "no thresholds")
    return Predictor(source=source, weights_url=checkpoint, step=step, classes=classes, thresholds=thresholds,
                     image_size=saved.data.image_size, augment=saved.data.augment, decoder=saved.data.decoder,
                     loader=loader)


def _load_checkpoint_model(checkpoint: str, raw_config: dict, storage: StorageConfig | None, weights: str,
                           device: torch.device) -> torch.nn.Module:
    config = Config.model_validate(raw_config)
    state = read_checkpoint_state(checkpoint, storage, map_location="cpu")
    model = build_model(config)
    if weights == "ema":
        if state.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights (train.ema_decay was null); use predict.weights=raw")
        model.load_state_dict(state["ema"]["shadow"])
    else:
        model.load_state_dict(state["model"])
    return model.to(device)


def _class_names(saved: Config, commit: dict, storage: StorageConfig | None) -> list[str]:
    """The model's class names in id order: the classes file its COMMIT names, else data.train's classes.tsv."""
    fingerprint = commit.get("class_fingerprint") or {}
    tried = []
    if fingerprint.get("classes"):
        try:
            return [c.name for c in read_vocabulary(fingerprint["classes"], storage)]
        except StorageError as exc:
            tried.append(str(exc))
    if saved.data.train:
        try:
            return [c.name for c in read_classes(saved.data.train, read_manifest(saved.data.train, storage), storage)]
        except StorageError as exc:
            tried.append(str(exc))
    log.warning("class names unavailable (%s); predicting class ids", "; ".join(tried) or "no classes file named")
    return [str(i) for i in range(saved.model.num_classes)]


def run_dir_of(checkpoint: str) -> str:
    """<run> of <run>/checkpoints/step-NNNNNNNNN."""
    return checkpoint.rstrip("/").rsplit("/", 2)[0]


def _thresholds(checkpoint: str, step: int | None, classes: list[str],
                storage: StorageConfig | None) -> ClassThresholds | None:
    url = thresholds_url(run_dir_of(checkpoint), step) if step is not None else None
    if url is None or not exists(url, storage):
        log.warning("no decision thresholds for %s (%s missing: run the evaluator on this checkpoint); predictions "
                    "get top-k classes only, with empty label lists", checkpoint, url)
        return None
    thresholds = read_thresholds(url, storage)
    if len(thresholds.classes) != len(classes):
        raise ValueError(f"{url} has thresholds for {len(thresholds.classes)} classes, the model {len(classes)}")
    if thresholds.classes != classes:
        log.warning("%s names its classes differently from the model's classes file; using the model's names", url)
    return thresholds
