"""Where a model for inference comes from: a model package, a checkpoint, or a run directory's latest checkpoint.

`load_model(url)` gives a `ModelPackage` (model in eval mode, class names, thresholds or None, model.json-style
metadata) whichever of the three `url` is, so prediction and export treat them alike. From a checkpoint, the
model is rebuilt from its saved config, the class names come from its training data's classes.tsv (checked
against the class fingerprint the checkpoint recorded) and the thresholds from
`<run>/reports/thresholds/step-NNNNNNNNN.json` when the evaluator wrote one for that step.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from pipeline.config import Config, StorageConfig
from pipeline.data.format import class_fingerprint, read_classes, read_manifest
from pipeline.models import build_model
from pipeline.models.package import MANIFEST_FILE, ModelPackage, architecture_options, new_package, read_package
from pipeline.models.thresholds import ClassThresholds, read_thresholds, thresholds_url
from pipeline.storage import exists, join_url
from pipeline.storage.checkpoints import (
    CHECKPOINTS,
    CheckpointRef,
    find_checkpoint,
    is_step_dir,
    read_checkpoint_config,
    read_checkpoint_state,
    read_commit,
    run_dir_of,
    saved_weights,
)

log = logging.getLogger(__name__)

Weights = Literal["ema", "raw"]


def resolve_checkpoint(url: str, storage: StorageConfig | None = None) -> CheckpointRef:
    """The checkpoint `url` names: itself when it is a checkpoint (<run>/checkpoints/step-NNNNNNNNN, complete),
    else the latest complete checkpoint of the run directory `url`."""
    ref = find_checkpoint(url, storage)
    if ref is None and is_step_dir(url):
        raise ValueError(f"{url} is not a complete checkpoint (no COMMIT marker): training may still be writing "
                         f"it, or it died before publishing it")
    if ref is None:
        raise ValueError(f"no complete checkpoint in {join_url(url, CHECKPOINTS)}: give a run directory that has "
                         f"one, a checkpoint URL (<run>/checkpoints/step-NNNNNNNNN) or a model package (holds "
                         f"{MANIFEST_FILE})")
    return ref


def training_classes(config: Config, fingerprint: dict | None, storage: StorageConfig | None) -> list[str]:
    """Class names in id order from the training data's classes.tsv, refused if they are not the ones the
    checkpoint was trained with (its COMMIT's class fingerprint, when it has one)."""
    prefix = config.data.train
    if prefix is None:
        raise ValueError("the checkpoint's config has no data.train: its class names cannot be found")
    manifest = read_manifest(prefix, storage)
    if fingerprint is not None and class_fingerprint(prefix, manifest, storage)["sha256"] != fingerprint["sha256"]:
        raise ValueError(f"the classes in {join_url(prefix, manifest.classes)} are not the ones the checkpoint was "
                         f"trained with ({fingerprint['classes']}): the classes file changed since")
    return [c.name for c in read_classes(prefix, manifest, storage)]


def checkpoint_thresholds(checkpoint: CheckpointRef, storage: StorageConfig | None) -> ClassThresholds | None:
    """The evaluator's per-class thresholds for this checkpoint's step, or None (logged) when it wrote none."""
    url = thresholds_url(run_dir_of(checkpoint.url), checkpoint.step)
    if not exists(url, storage):
        log.warning("no decision thresholds for step %d (%s not found: run the evaluator on this checkpoint); "
                    "without them a model ranks classes but assigns no labels", checkpoint.step, url)
        return None
    return read_thresholds(url, storage)


def checkpoint_model(checkpoint_url: str, config: Config, weights: Weights, storage: StorageConfig | None = None,
                     map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model `config` describes with the checkpoint's EMA (Polyak-averaged) or raw weights."""
    tensors = saved_weights(read_checkpoint_state(checkpoint_url, storage, map_location=map_location), weights)
    if tensors is None:
        raise ValueError(f"{checkpoint_url} has no EMA weights (train.ema_decay was null): use the raw weights")
    model = build_model(config).to(map_location)
    model.load_state_dict(tensors)
    return model


def package_from_checkpoint(url: str, weights: Weights = "ema", storage: StorageConfig | None = None,
                            image_size: int | None = None, map_location: str | torch.device = "cpu") -> ModelPackage:
    """The model of checkpoint (or run directory) `url` with its EMA or raw weights, classes and thresholds.

    `image_size` (default: the checkpoint's data.image_size) is the input side the metadata records."""
    checkpoint = resolve_checkpoint(url, storage)
    config = read_checkpoint_config(checkpoint.url, storage)
    commit = read_commit(checkpoint.url, storage)
    classes = training_classes(config, commit.get("class_fingerprint"), storage)  # before the large read
    model = checkpoint_model(checkpoint.url, config, weights, storage, map_location)
    thresholds = checkpoint_thresholds(checkpoint, storage)
    source = {"run": run_dir_of(checkpoint.url), "checkpoint": checkpoint.url, "step": checkpoint.step,
              "samples_seen": commit.get("samples_seen"), "training_data": config.data.train,
              "class_fingerprint": commit.get("class_fingerprint"),
              "thresholds": None if thresholds is None else thresholds_url(run_dir_of(checkpoint.url), checkpoint.step)}
    return new_package(model, architecture_options(config.model), classes,
                       image_size=image_size or config.data.image_size, activation=config.loss.activation,
                       weights=weights, thresholds=thresholds, source=source,
                       center_crop=config.data.augment.eval_crop_fraction)


def load_model(url: str, weights: Weights = "ema", storage: StorageConfig | None = None,
               map_location: str | torch.device = "cpu") -> ModelPackage:
    """The model at `url`: a model package (has model.json; `weights` is what it was exported with), a checkpoint,
    or a run directory (its latest complete checkpoint, with `weights`)."""
    if exists(join_url(url, MANIFEST_FILE), storage):
        return read_package(url, storage, map_location=map_location)
    return package_from_checkpoint(url, weights, storage, map_location=map_location)
