"""Metric units: what the scoring loop feeds, so that a new metric is a new unit and never a change to the loop.

A unit keeps one kind of result (big_vision's evaluators, in small). The loop calls `update` with each batch's
scored rows: the model's logits (R, C), multi-hot targets (R, C), dataset-wide image ids (R,), the loader batch
and `rows`, the positions of those R rows in it. A Ray scoring task returns `state_dict()`; the driver rebuilds
each unit from the first share's state (`from_state_dict`, no dataset read) and `merge`s the others in rank
order. `compute(weights, thirds)` names the unit's values; the names are `Evaluation`'s fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.evaluation.baselines import BaselineScorers
from pipeline.evaluation.class_weights import class_prior
from pipeline.evaluation.frequency_thirds import FrequencyThirds
from pipeline.evaluation.map_metric import MeanAveragePrecisionAtK
from pipeline.evaluation.threshold_fit import ThresholdCounts

if TYPE_CHECKING:
    from pipeline.data.loading import Batch

EXAMPLES = 8  # images kept (with their top predictions) for the report


class MetricUnit(Protocol):
    def update(self, logits: Tensor, targets: Tensor, ids: Tensor, batch: Batch, rows: Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def merge(self, state: dict[str, Any]) -> None: ...

    def compute(self, weights: Tensor | None, thirds: FrequencyThirds | None = None) -> dict[str, Any]: ...


class MapAtKUnit:
    """MAP@K and its companions of the model's scores (`MeanAveragePrecisionAtK`): the value "result".

    Its state is the metric itself (a picklable torchmetrics `Metric`, its row buffer folded in); shares are merged
    with torchmetrics' `merge_state`."""

    def __init__(self, metric: MeanAveragePrecisionAtK) -> None:
        self.metric = metric

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MapAtKUnit:
        return cls(state["metric"])

    def update(self, logits: Tensor, targets: Tensor, ids: Tensor, batch: Batch, rows: Tensor) -> None:
        self.metric.update(logits, targets, ids)

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric}

    def merge(self, state: dict[str, Any]) -> None:
        self.metric.merge_state(state["metric"])

    def compute(self, weights: Tensor | None, thirds: FrequencyThirds | None = None) -> dict[str, Any]:
        return {"result": self.metric.result(weights)}


class BaselinesUnit:
    """The random and class-prior scores of the same images (`BaselineScorers`): the value "baselines"."""

    def __init__(self, scorers: BaselineScorers) -> None:
        self.scorers = scorers

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BaselinesUnit:
        return cls(BaselineScorers.from_state_dict(state))

    def update(self, logits: Tensor, targets: Tensor, ids: Tensor, batch: Batch, rows: Tensor) -> None:
        self.scorers.update(targets, ids)  # the logits are what a baseline never looks at

    def state_dict(self) -> dict[str, Any]:
        return self.scorers.state_dict()

    def merge(self, state: dict[str, Any]) -> None:
        self.scorers.merge(state)

    def compute(self, weights: Tensor | None, thirds: FrequencyThirds | None = None) -> dict[str, Any]:
        return {"baselines": self.scorers.compute(weights, thirds)}


class ExampleKeeper:
    """The first `count` scored images with their top-5 predictions and true labels, for the report: the value
    "examples"."""

    def __init__(self, count: int = EXAMPLES, examples: list[dict[str, Any]] | None = None) -> None:
        self.count = count
        self.examples = examples if examples is not None else []

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ExampleKeeper:
        return cls(state["count"], list(state["examples"]))

    def update(self, logits: Tensor, targets: Tensor, ids: Tensor, batch: Batch, rows: Tensor) -> None:
        for row, i in enumerate(rows.tolist()):
            if len(self.examples) >= self.count:
                return
            top = logits[row].topk(min(5, logits.shape[1]))
            self.examples.append({
                "key": batch.keys[i], "image": batch.images[i].permute(1, 2, 0).cpu().numpy(),
                "top": list(zip(top.indices.tolist(), torch.sigmoid(top.values).tolist(), strict=True)),
                "labels": targets[row].nonzero().squeeze(1).tolist(),
            })

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}

    def merge(self, state: dict[str, Any]) -> None:
        self.examples += state["examples"]

    def compute(self, weights: Tensor | None, thirds: FrequencyThirds | None = None) -> dict[str, Any]:
        return {"examples": self.examples[: self.count]}


UNIT_TYPES = {"map": MapAtKUnit, "baselines": BaselinesUnit, "examples": ExampleKeeper, "thresholds": ThresholdCounts}


def metric_units(config: Config, baselines: bool) -> dict[str, MetricUnit]:
    """The units one scoring pass feeds: MAP@K, the report's examples, the per-class decision thresholds
    (`pipeline.evaluation.threshold_fit`) and, with `baselines`, the baselines."""
    num_classes = config.model.num_classes
    units: dict[str, MetricUnit] = {"map": MapAtKUnit(MeanAveragePrecisionAtK(num_classes, config.eval.k)),
                                    "examples": ExampleKeeper(),
                                    "thresholds": ThresholdCounts(num_classes, config.eval.threshold_min_positives)}
    if baselines:
        units["baselines"] = BaselinesUnit(BaselineScorers.for_prior(class_prior(config), config.eval.k))
    return units


def merged_units(states: list[dict[str, dict[str, Any]]]) -> dict[str, MetricUnit]:
    """Units rebuilt from the shares' `state_dict`s (one dict of unit states per share), merged in share order."""
    units: dict[str, MetricUnit] = {name: UNIT_TYPES[name].from_state_dict(state) for name, state in states[0].items()}
    for share in states[1:]:
        for name, unit in units.items():
            unit.merge(share[name])
    return units
