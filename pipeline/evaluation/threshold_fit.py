"""Per-class decision thresholds from the evaluation set: the max-F1 threshold per class, streamed in fixed bins.

A multi-label user asks "which labels does this image have"; a ranking does not say. For each class the threshold
on sigmoid(logit) that maximises F1 on the dense evaluation set answers it; a class with fewer than
`eval.threshold_min_positives` positives there gets the global threshold instead (the one that maximises F1 of all
classes' decisions pooled, i.e. micro-F1), since a max over a handful of positives is noise.

Streaming and bounded: `ThresholdCounts` keeps, per class, a histogram of logits of the positives and one of the
negatives over fixed bins, for each of two halves of the images (2 x 2 x C x BINS int32 counts: 266 MiB at 17,000
classes, whatever the number of images). Histograms add, so Ray shares merge exactly. Counting the positives and
negatives at or above each bin edge gives the exact true- and false-positive counts of the threshold at that edge,
so F1 is exact at every edge; the only approximation is that candidate thresholds are the edges, not every score.
The best edge is the lower edge of the bin that holds the exact optimum's score, so its F1 differs from the exact
max only by the images inside that one bin (tested against an exact sort-based max-F1).

Held out, not in-sample: a threshold chosen to maximise F1 on some images scores better on them than on others, so
the F1 the evaluator reports (`ThresholdFit.held_out_f1`, `threshold_mean_f1` in map100.jsonl) is cross-fitted:
images fall in two halves by a hash of their dataset-wide id (`fold_of`: the same whatever the Ray share), the
thresholds fitted on each half are scored on the other, and each class's true and false positives are pooled over
both, so every image is judged by thresholds fitted without it. The thresholds written for prediction are fitted on
all images (the best estimate); their in-sample F1 is kept beside (`f1`, `threshold_mean_f1_in_sample`) to show the
optimism. Two halves cost one more set of histograms; each has the whole set's expected class balance.

Why bins in logit space, 1024 of them over logits [-12, 12] (width 0.0235, plus one bin below and one above):
thresholds of rare classes sit at small probabilities (0.01-0.1), where bins uniform in probability would be far
too coarse; uniform in logit they have the same relative resolution everywhere: a bin is 0.6% of the odds wide,
at most 0.006 in probability (at p = 0.5) and 0.0002 at p = 0.01. Beyond |logit| = 12 (p < 6e-6 or > 0.999994)
no useful threshold lives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.models.thresholds import ClassThresholds

if TYPE_CHECKING:
    from pipeline.data.loading import Batch
    from pipeline.evaluation.frequency_thirds import FrequencyThirds

BINS = 1024
FOLDS = 2
_HASH = 2654435761  # Knuth's multiplicative hash: the top bit of (id x this) mod 2**32 picks an image's half
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
    f1: list[float]  # in-sample: F1 at each class's threshold on the images it was fitted on (optimistic)
    held_out_f1: list[float] = field(default_factory=list)  # cross-fitted over two halves (module doc)

    def _mean(self, values: list[float]) -> float | None:
        """Mean of per-class `values` over the classes with at least one positive (None when there is none)."""
        kept = [f for f, p in zip(values, self.positives, strict=True) if p > 0]
        return sum(kept) / len(kept) if kept else None

    def mean_f1(self) -> float | None:
        """Mean in-sample F1 at the thresholds over the classes with a positive (None when there is none)."""
        return self._mean(self.f1)

    def mean_held_out_f1(self) -> float | None:
        """Mean held-out F1 over the classes with a positive: what the thresholds do on images they did not see."""
        return self._mean(self.held_out_f1) if self.held_out_f1 else None

    def as_class_thresholds(self, classes: list[str], step: int | None) -> ClassThresholds:
        return ClassThresholds(classes=classes, thresholds=self.thresholds, global_threshold=self.global_threshold,
                               min_positives=self.min_positives, step=step, positives=self.positives, f1=self.f1,
                               held_out_f1=self.held_out_f1)


def edge_probability(index: Tensor) -> Tensor:
    """The probability threshold of "bins >= index": 0 for bin 0 (everything), else sigmoid(EDGES[index - 1])."""
    edges = torch.cat([torch.tensor([-math.inf]), EDGES.double()])
    return torch.sigmoid(edges[index])


def at_or_above(histogram: Tensor) -> Tensor:
    """(..., BINS) counts -> (..., BINS) counts at or above each edge i: the positives (or negatives) that
    predicting "bin >= i" labels positive."""
    return histogram.flip(-1).cumsum(-1).flip(-1).double()


def f1_of(true_pos: Tensor, false_pos: Tensor, positives: Tensor) -> Tensor:
    """F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P), 0 where there is nothing to count."""
    denominator = true_pos + false_pos + positives
    return torch.where(denominator > 0, 2 * true_pos / denominator.clamp(min=1), torch.zeros_like(denominator))


def f1_at_edges(positive: Tensor, negative: Tensor) -> Tensor:
    """(..., BINS) histograms -> (..., BINS) F1 of predicting "bin >= i" positive, for every edge i (0 where no
    positives exist)."""
    true_pos = at_or_above(positive)
    return f1_of(true_pos, at_or_above(negative), true_pos[..., :1])


def best_edges(f1: Tensor) -> Tensor:
    """Index of the max-F1 edge along the last axis; among equal maxima the highest threshold (fewest labels)."""
    last = f1.shape[-1] - 1
    return last - f1.flip(-1).argmax(-1)


def chosen_edges(counts: Tensor, min_positives: int) -> tuple[Tensor, Tensor]:
    """(2, C, BINS) counts -> (each class's edge: its own max-F1 one, or the global one where it has fewer than
    `min_positives` positives; the global edge, of all classes' decisions pooled)."""
    negative, positive = counts[0].long(), counts[1].long()
    global_edge = best_edges(f1_at_edges(positive.sum(0), negative.sum(0)))
    own = positive.sum(-1) >= min_positives
    return torch.where(own, best_edges(f1_at_edges(positive, negative)), global_edge), global_edge


def fit_thresholds(counts: Tensor, min_positives: int) -> ThresholdFit:
    """(2, C, BINS) counts (negatives, positives) -> per-class max-F1 thresholds, global micro-F1 fallback, with
    their in-sample F1 (on these same counts)."""
    edges, global_edge = chosen_edges(counts, min_positives)
    f1 = f1_at_edges(counts[1].long(), counts[0].long()).gather(-1, edges[:, None]).squeeze(-1)
    return ThresholdFit(thresholds=edge_probability(edges).tolist(),
                        global_threshold=float(edge_probability(global_edge)), min_positives=min_positives,
                        positives=counts[1].long().sum(-1).tolist(), f1=f1.tolist())


def cross_fitted_f1(folds: Tensor, min_positives: int) -> list[float]:
    """(FOLDS, 2, C, BINS) counts -> per-class F1 of thresholds fitted on each fold and scored on the other(s), true
    and false positives pooled over the folds: every image judged by thresholds fitted without it."""
    true_pos = torch.zeros(folds.shape[2], dtype=torch.float64)
    false_pos, positives = torch.zeros_like(true_pos), torch.zeros_like(true_pos)
    for fold in range(folds.shape[0]):
        edges = chosen_edges(folds[fold], min_positives)[0][:, None]
        others = folds.sum(0) - folds[fold]
        true_pos += at_or_above(others[1].long()).gather(-1, edges).squeeze(-1)
        false_pos += at_or_above(others[0].long()).gather(-1, edges).squeeze(-1)
        positives += others[1].long().sum(-1)
    return f1_of(true_pos, false_pos, positives).tolist()


def fold_of(ids: Tensor) -> Tensor:
    """The half (0 or 1) of the evaluation images each dataset-wide image id falls in: a hash, so that the halves
    do not follow the dataset's order (shards, sources), and the same in every Ray share."""
    return ((ids.long() * _HASH) % 2**32) >> 31


class ThresholdCounts:
    """Per-class histograms of positives' and negatives' logits, per half of the images (`fold_of`): the evaluator's
    metric unit "thresholds"."""

    def __init__(self, num_classes: int, min_positives: int, counts: Tensor | None = None) -> None:
        if min_positives < 1:
            raise ValueError(f"min_positives must be at least 1, got {min_positives}")
        self.num_classes = num_classes
        self.min_positives = min_positives
        self.counts = counts if counts is not None else torch.zeros(FOLDS, 2, num_classes, BINS, dtype=torch.int32)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ThresholdCounts:
        return cls(state["num_classes"], state["min_positives"], state["counts"])

    def add(self, logits: Tensor, targets: Tensor, ids: Tensor) -> None:
        """Count (R, C) logits under (R, C) 0/1 targets, each row in the half of its dataset-wide image id (R,)."""
        if logits.shape != targets.shape or logits.shape[-1] != self.num_classes or ids.shape != logits.shape[:1]:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be "
                             f"(rows, {self.num_classes}), with one image id per row (ids {tuple(ids.shape)})")
        logits = logits.detach().float().cpu()
        bins = torch.bucketize(logits, EDGES, right=True)  # the number of edges <= x: 0 .. BINS-1
        classes = torch.arange(self.num_classes).expand_as(bins)
        fold = fold_of(ids.detach().cpu())[:, None]
        index = ((fold * 2 + targets.detach().cpu().long()) * self.num_classes + classes) * BINS + bins
        self.counts.view(-1).index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int32))

    def update(self, logits: Tensor, targets: Tensor, ids: Tensor, batch: Batch, rows: Tensor) -> None:
        self.add(logits, targets, ids)

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "min_positives": self.min_positives, "counts": self.counts}

    def merge(self, state: dict[str, Any]) -> None:
        self.counts += state["counts"]

    def fit(self) -> ThresholdFit:
        """Thresholds fitted on every image, with their in-sample and their cross-fitted (held-out) F1."""
        fit = fit_thresholds(self.counts.sum(0), self.min_positives)
        return replace(fit, held_out_f1=cross_fitted_f1(self.counts, self.min_positives))

    def compute(self, weights: Tensor | None, thirds: FrequencyThirds | None = None) -> dict[str, Any]:
        return {"thresholds": self.fit()}
