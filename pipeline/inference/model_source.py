"""What a prediction replica loads: `load_predictor(source)` -> how to decode, which classes, which model to build.

A source is resolved once on the driver into a `Predictor`: light, picklable, shipped to every Ray Data replica,
which then builds the model with its weights once (`Predictor.build`). A source is a model package (exported by
`jobs/export_model.py`: it carries its classes, thresholds and input size), a checkpoint URL, or a run directory
(its latest complete checkpoint); checkpoints are resolved exactly as export resolves them
(`pipeline.inference.sources`): the saved config's architecture, input size and eval crop, the EMA or raw weights,
the training classes (checked against the checkpoint's class fingerprint) and the evaluator's thresholds for that
step when it wrote them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import AugmentConfig, Config, DataConfig, StorageConfig
from pipeline.inference.sources import (
    Weights,
    checkpoint_model,
    checkpoint_thresholds,
    resolve_checkpoint,
    training_classes,
)
from pipeline.models.package import MANIFEST_FILE, read_package, read_package_manifest
from pipeline.models.thresholds import ClassThresholds
from pipeline.storage import exists, join_url
from pipeline.storage.checkpoints import read_checkpoint_config, read_commit

log = logging.getLogger(__name__)

ModelLoader = Callable[[torch.device], torch.nn.Module]  # picklable: it travels to every replica


@dataclass(frozen=True)
class Predictor:
    """A model to predict with, before its weights are loaded: how to decode, which classes, which thresholds."""

    source: str  # what was asked for
    weights_url: str  # where the weights are (a checkpoint or a package URL)
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


def load_predictor(source: str, storage: StorageConfig | None = None, weights: Weights = "ema") -> Predictor:
    """The `Predictor` of a model package, a checkpoint URL or a run directory (its latest complete checkpoint)."""
    if exists(join_url(source, MANIFEST_FILE), storage):
        return _from_package(source, storage)
    checkpoint = resolve_checkpoint(source, storage)
    saved = read_checkpoint_config(checkpoint.url, storage)
    classes = training_classes(saved, read_commit(checkpoint.url, storage).get("class_fingerprint"), storage)
    thresholds = checkpoint_thresholds(checkpoint, storage)
    if thresholds is not None and len(thresholds.classes) != len(classes):
        raise ValueError(f"the thresholds of step {checkpoint.step} are for {len(thresholds.classes)} classes, the "
                         f"model has {len(classes)}")
    loader = functools.partial(_checkpoint_loader, checkpoint.url, saved.model_dump(mode="json"), storage, weights)
    log.info("predicting with %s (step %d, %s weights, %d classes, %s)", checkpoint.url, checkpoint.step, weights,
             len(classes), "per-class thresholds" if thresholds else "no thresholds")
    return Predictor(source=source, weights_url=checkpoint.url, step=checkpoint.step, classes=classes,
                     thresholds=thresholds, image_size=saved.data.image_size, augment=saved.data.augment,
                     decoder=saved.data.decoder, loader=loader)


def _from_package(url: str, storage: StorageConfig | None) -> Predictor:
    """A package's predictor, from its model.json alone (the weights are read by each replica)."""
    metadata = read_package_manifest(url, storage)
    inline = metadata.get("thresholds")
    thresholds = ClassThresholds.from_json(json.dumps(inline), source=url) if inline else None
    log.info("predicting with the model package %s (step %s, %d classes, %s)", url, metadata["source"].get("step"),
             len(metadata["classes"]), "per-class thresholds" if thresholds else "no thresholds")
    return Predictor(source=url, weights_url=url, step=metadata["source"].get("step"), classes=metadata["classes"],
                     thresholds=thresholds, image_size=int(metadata["input"]["image_size"]),
                     augment=AugmentConfig(eval_crop_fraction=metadata["input"].get("center_crop", 1.0)),
                     decoder=DataConfig().decoder, loader=functools.partial(_package_loader, url, storage))


def _checkpoint_loader(checkpoint: str, raw_config: dict, storage: StorageConfig | None, weights: Weights,
                       device: torch.device) -> torch.nn.Module:
    return checkpoint_model(checkpoint, Config.model_validate(raw_config), weights, storage).to(device)


def _package_loader(url: str, storage: StorageConfig | None, device: torch.device) -> torch.nn.Module:
    return read_package(url, storage, map_location=device).model
