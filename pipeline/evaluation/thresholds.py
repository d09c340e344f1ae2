"""Per-class decision thresholds from the evaluation set: the max-F1 threshold per class, streamed in fixed bins.

A multi-label user asks "which labels does this image have"; a ranking does not say. For each class the threshold
on sigmoid(logit) that maximises F1 on the dense evaluation set answers it; a class with fewer than
`eval.threshold_min_positives` positives there gets the global threshold instead (the one that maximises F1 of all
classes' decisions pooled, i.e. micro-F1), since a max over a handful of positives is noise.

Streaming and bounded: `ThresholdCounts` keeps, per class, a histogram of logits of the positives and one of the
negatives over fixed bins (2 x C x BINS int32 counts: 133 MiB at 17,000 classes, whatever the number of images).
Histograms add, so Ray shares merge exactly. Counting the positives and negatives at or above each bin edge gives
the exact true- and false-positive counts of the threshold at that edge, so F1 is exact at every edge; the only
approximation is that candidate thresholds are the edges, not every score. The best edge is the lower edge of the
bin that holds the exact optimum's score, so its F1 differs from the exact max only by the images inside that one
bin (tested against an exact sort-based max-F1).

Why bins in logit space, 1024 of them over logits [-12, 12] (width 0.0235, plus one bin below and one above):
thresholds of rare classes sit at small probabilities (0.01-0.1), where bins uniform in probability would be far
too coarse; uniform in logit they have the same relative resolution everywhere: a bin is 0.6% of the odds wide,
at most 0.006 in probability (at p = 0.5) and 0.0002 at p = 0.01. Beyond |logit| = 12 (p < 6e-6 or > 0.999994)
no useful threshold lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.models.thresholds import ClassThresholds

if TYPE_CHECKING:
    from pipeline.data import Batch
    from pipeline.evaluation.frequency_thirds import FrequencyThirds

BINS = 1024
LOGIT_RANGE = 12.0
# Bin i holds EDGES[i-1] <= logit < EDGES[i] (bin 0: below the first edge; bin BINS-1: at or above the last).
EDGES = torch.linspace(-LOGIT_RANGE, LOGIT_RANGE, BINS - 1, dtype=torch.float32)


@dataclass(frozen=True)
class ThresholdFit:
    """What the counts give, before class names and the step are attached (`as_class_thresholds`)."""

    thresholds: list[float]  # per class, the global one where positives < min_positives
    global_threshold: float
    min_positives: int
    positives: list[int]
    f1: list[float]  # eval-set F1 at each class's threshold

    def mean_f1(self) -> float | None:
        """Mean F1 at the thresholds over the classes with at least one positive (None when there is none)."""
        values = [f for f, p in zip(self.f1, self.positives, strict=True) if p > 0]
        return sum(values) / len(values) if values else None

    def as_class_thresholds(self, classes: list[str], step: int | None) -> ClassThresholds:
        return ClassThresholds(classes=classes, thresholds=self.thresholds, global_threshold=self.global_threshold,
                               min_positives=self.min_positives, step=step, positives=self.positives, f1=self.f1)


def edge_probability(index: Tensor) -> Tensor:
    """The probability threshold of "bins >= index": 0 for bin 0 (everything), else sigmoid(EDGES[index - 1])."""
    edges = torch.cat([torch.tensor([-math.inf]), EDGES.double()])
    return torch.sigmoid(edges[index])


def f1_at_edges(positive: Tensor, negative: Tensor) -> Tensor:
    """(..., BINS) histograms -> (..., BINS) F1 of predicting "bin >= i" positive, for every edge i (0 where no
    positives exist)."""
    true_pos = positive.flip(-1).cumsum(-1).flip(-1).double()  # positives at or above edge i
    false_pos = negative.flip(-1).cumsum(-1).flip(-1).double()
    total = true_pos[..., :1]
    denominator = true_pos + false_pos + total  # 2TP + FP + FN = TP + FP + P
    return torch.where(denominator > 0, 2 * true_pos / denominator.clamp(min=1), torch.zeros_like(denominator))


def best_edges(f1: Tensor) -> Tensor:
    """Index of the max-F1 edge along the last axis; among equal maxima the highest threshold (fewest labels)."""
    last = f1.shape[-1] - 1
    return last - f1.flip(-1).argmax(-1)


def fit_thresholds(counts: Tensor, min_positives: int) -> ThresholdFit:
    """(2, C, BINS) counts (negatives, positives) -> per-class max-F1 thresholds, global micro-F1 fallback."""
    negative, positive = counts[0].long(), counts[1].long()
    per_class = f1_at_edges(positive, negative)
    pooled = f1_at_edges(positive.sum(0), negative.sum(0))
    global_edge = best_edges(pooled)
    global_threshold = float(edge_probability(global_edge))
    edges = best_edges(per_class)
    positives = positive.sum(-1)
    own = positives >= min_positives
    chosen = torch.where(own, edges, global_edge)
    f1 = per_class.gather(-1, chosen[:, None]).squeeze(-1)
    thresholds = torch.where(own, edge_probability(edges), torch.full_like(f1, global_threshold))
    return ThresholdFit(thresholds=thresholds.tolist(), global_threshold=global_threshold,
                        min_positives=min_positives, positives=positives.tolist(), f1=f1.tolist())


class ThresholdCounts:
    """Per-class histograms of positives' and negatives' logits (the evaluator's metric unit "thresholds")."""

    def __init__(self, num_classes: int, min_positives: int, counts: Tensor | None = None) -> None:
        if min_positives < 1:
            raise ValueError(f"min_positives must be at least 1, got {min_positives}")
        self.num_classes = num_classes
        self.min_positives = min_positives
        self.counts = counts if counts is not None else torch.zeros(2, num_classes, BINS, dtype=torch.int32)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ThresholdCounts:
        return cls(state["num_classes"], state["min_positives"], state["counts"])

    def add(self, logits: Tensor, targets: Tensor) -> None:
        """Count (R, C) logits under (R, C) 0/1 targets."""
        if logits.shape != targets.shape or logits.shape[-1] != self.num_classes:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be "
                             f"(rows, {self.num_classes})")
        logits = logits.detach().float().cpu()
        bins = torch.bucketize(logits, EDGES, right=True)  # the number of edges <= x: 0 .. BINS-1
        classes = torch.arange(self.num_classes).expand_as(bins)
        index = (targets.detach().cpu().long() * self.num_classes + classes) * BINS + bins
        self.counts.view(-1).index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int32))

    def update(self, logits: Tensor, targets: Tensor, ids: Tensor, batch: Batch, rows: Tensor) -> None:
        self.add(logits, targets)

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "min_positives": self.min_positives, "counts": self.counts}

    def merge(self, state: dict[str, Any]) -> None:
        self.counts += state["counts"]

    def fit(self) -> ThresholdFit:
        return fit_thresholds(self.counts, self.min_positives)

    def compute(self, weights: Tensor | None, thirds: FrequencyThirds | None = None) -> dict[str, Any]:
        return {"thresholds": self.fit()}
