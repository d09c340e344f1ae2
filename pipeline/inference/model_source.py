"""Where the model to run comes from: a model package, a checkpoint, or a run directory's latest checkpoint.

Two ways to take it, for two users:

- `load_model(url)` gives a `ModelPackage` (model in eval mode, class names, thresholds or None, model.json-style
  metadata) whichever of the three `url` is: what export packages.
- `load_predictor(url)` gives a `Predictor`: light, picklable, resolved once on the driver and shipped to every Ray
  Data replica, which then builds the model with its weights once (`Predictor.build`): what prediction runs.

Both resolve a checkpoint alike: the model is rebuilt from its saved config (architecture, input size, eval crop),
with its EMA or raw weights (`pipeline.checkpoint.read_weights`: EMA asked for and none kept is refused), the class
names come from its training data's classes.tsv (checked against the class fingerprint the checkpoint recorded)
and the thresholds from `<run>/reports/thresholds/step-NNNNNNNNN.json` when the evaluator wrote one for that step.
A package (exported by `jobs/export_model.py`) carries its classes, thresholds and input size.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.checkpoint.format import (
    CHECKPOINTS,
    CheckpointRef,
    Weights,
    find_checkpoint,
    is_step_dir,
    read_checkpoint_config,
    read_commit,
    read_weights,
    run_dir_of,
)
from pipeline.config import AugmentConfig, Config, DataConfig, StorageConfig
from pipeline.data.format import class_fingerprint, read_classes, read_manifest
from pipeline.models import build_model
from pipeline.models.package import (
    MANIFEST_FILE,
    ModelPackage,
    architecture_options,
    new_package,
    read_package,
    read_package_manifest,
)
from pipeline.models.thresholds import ClassThresholds, read_thresholds, thresholds_url
from pipeline.storage import exists, join_url

log = logging.getLogger(__name__)


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
    """The model `config` describes with the checkpoint's EMA (Polyak-averaged) or raw weights (`pipeline.checkpoint`'s
    policy: EMA asked for and none kept is refused)."""
    tensors = read_weights(checkpoint_url, weights, storage, map_location=map_location)
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


# A predictor: what prediction ships to its replicas ----------------------------------------

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
