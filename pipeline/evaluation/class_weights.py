"""Per-class numbers from a dataset's classes.tsv: the MAP class weights and the training frequencies behind them.

`eval.class_weights` picks the weights: `uniform`, `train_frequency` (how often each class labels a training
image: classes.tsv's `train_frequency` column) or `classes_file` (classes.tsv's `weight` column of the
evaluation set). The frequencies come from the training set's classes.tsv, or the evaluation set's when training
data is not known; `frequency_classes` is the one reader of them (the class-prior baseline and the report use it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.data.format import ClassInfo, read_classes, read_manifest
from pipeline.storage import join_url


def frequency_source(config: Config) -> str:
    """The dataset prefix whose classes.tsv holds the training frequencies: data.train, else data.eval."""
    prefix = config.data.train or config.data.eval
    if prefix is None:
        raise ValueError("class frequencies need data.train or data.eval (their classes.tsv)")
    return prefix


def frequency_classes(config: Config) -> list[ClassInfo]:
    """The classes (names, training frequencies) of `frequency_source`."""
    prefix = frequency_source(config)
    return read_classes(prefix, read_manifest(prefix, config.storage), config.storage)


def class_prior(config: Config) -> Tensor:
    """Each class's training frequency, float64 (C,)."""
    return torch.tensor([float(c.train_frequency) for c in frequency_classes(config)], dtype=torch.float64)


def column_weights(classes: list[ClassInfo], source: str) -> Tensor:
    """The `weight` column of `classes` (read from `source`), float64 (C,).

    Every class needs a non-negative finite weight, so a half-filled column fails loudly instead of silently
    re-weighting MAP.
    """
    missing = [c.id for c in classes if c.weight is None]
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(classes)} classes have no weight (first: class "
                         f"{missing[0]}); fill the weight column or use eval.class_weights=uniform")
    bad = next((c for c in classes if not (math.isfinite(c.weight) and c.weight >= 0)), None)
    if bad is not None:
        raise ValueError(f"{source}: the weight of class {bad.id} ({bad.name}) must be finite and >= 0, "
                         f"got {bad.weight}")
    return torch.tensor([c.weight for c in classes], dtype=torch.float64)


def class_weights(config: Config) -> Tensor | None:
    """Per-class MAP weights from `eval.class_weights`: uniform (None), training frequency, or the evaluation
    set's classes.tsv `weight` column."""
    choice = config.eval.class_weights
    if choice == "uniform":
        return None
    if choice == "train_frequency":
        return class_prior(config)
    prefix = config.data.eval
    if prefix is None:
        raise ValueError("eval.class_weights=classes_file needs data.eval (its classes.tsv holds the weights)")
    manifest = read_manifest(prefix, config.storage)
    return column_weights(read_classes(prefix, manifest, config.storage), join_url(prefix, manifest.classes))
