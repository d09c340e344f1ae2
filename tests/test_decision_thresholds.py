"""Per-class max-F1 decision thresholds from binned counts, against an exact sort-based max-F1 in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.threshold_fit import BINS, EDGES, ThresholdCounts, fit_thresholds


def exact_optimum(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    """Max over every threshold t (predict score >= t) of F1, by sorting: the independent reference.

    Returns (max F1, its threshold score, predicted + actual positives there)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    positives = int(y.sum())
    if positives == 0:
        return 0.0, float("inf"), 0
    true_pos = np.cumsum(y)
    predicted = np.arange(1, len(y) + 1)
    last_of_tie = np.append(s[1:] != s[:-1], True)  # a threshold takes every image tied with its score
    f1 = np.where(last_of_tie, 2 * true_pos / (predicted + positives), -1.0)
    best = int(f1.argmax())
    return float(f1[best]), float(s[best]), int(predicted[best] + positives)


def exact_max_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    return exact_optimum(scores, labels)[0]


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    predicted = scores >= threshold
    true_pos = int((predicted & (labels == 1)).sum())
    denominator = int(predicted.sum()) + int(labels.sum())
    return 2 * true_pos / denominator if denominator else 0.0


def synthetic(rows: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits where positives score higher than negatives, with overlap, and class-dependent positive rates."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.02, 0.4, classes)
    targets = (torch.rand(rows, classes, generator=g) < rates).float()
    logits = torch.randn(rows, classes, generator=g) * 1.5 - 3.0 + 3.0 * targets
    return logits, targets


def test_binned_thresholds_match_the_exact_max_f1() -> None:
    logits, targets = synthetic(3000, 12, seed=0)
    counts = ThresholdCounts(12, min_positives=1)
    for chunk in range(0, 3000, 256):  # streamed in batches
        counts.add(logits[chunk:chunk + 256], targets[chunk:chunk + 256], torch.arange(3000)[chunk:chunk + 256])
    fit = counts.fit()
    probabilities = torch.sigmoid(logits).numpy()
    labels = targets.numpy().astype(np.int64)
    for c in range(12):
        exact, best_logit, denominator = exact_optimum(logits[:, c].numpy(), labels[:, c])  # same order as probs
        at_threshold = f1_at(probabilities[:, c], labels[:, c], fit.thresholds[c])
        assert fit.f1[c] == pytest.approx(at_threshold, abs=1e-9)  # counts at an edge are exact
        # The lower edge of the optimum's bin adds at most that bin's negatives below the optimum (m) to
        # TP + FP + P (= denominator), so F1 there is >= exact * D / (D + m); the best edge is at least as good.
        lower = EDGES[torch.bucketize(torch.tensor(best_logit), EDGES, right=True) - 1]
        column = logits[:, c]
        extra = int(((column >= lower) & (column < best_logit) & (targets[:, c] == 0)).sum())
        assert exact * denominator / (denominator + extra) - 1e-12 <= at_threshold <= exact + 1e-12
        assert fit.positives[c] == labels[:, c].sum()
    assert max(exact_max_f1(probabilities[:, c], labels[:, c]) - fit.f1[c] for c in range(12)) < 0.01


def test_scores_on_bin_edges_give_the_exact_optimum_and_threshold() -> None:
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, BINS - 1, (2000, 3), generator=g)
    logits = EDGES[index]  # every score is an edge: no approximation is left
    targets = (torch.rand(2000, 3, generator=g) < torch.sigmoid(logits)).float()
    counts = ThresholdCounts(3, min_positives=1)
    counts.add(logits, targets, torch.arange(2000))
    fit = counts.fit()
    for c in range(3):
        probabilities, labels = torch.sigmoid(logits[:, c]).numpy(), targets[:, c].numpy()
        assert fit.f1[c] == pytest.approx(exact_max_f1(probabilities, labels), abs=1e-12)


def test_rare_classes_get_the_pooled_global_threshold_and_shares_merge_exactly() -> None:
    logits, targets = synthetic(1200, 6, seed=2)
    targets[:, 0] = 0.0
    targets[:3, 0] = 1.0  # class 0: 3 positives, below min_positives
    whole = ThresholdCounts(6, min_positives=5)
    ids = torch.arange(1200)
    whole.add(logits, targets, ids)
    first, second = ThresholdCounts(6, min_positives=5), ThresholdCounts(6, min_positives=5)
    first.add(logits[:500], targets[:500], ids[:500])
    second.add(logits[500:], targets[500:], ids[500:])
    merged = ThresholdCounts.from_state_dict(first.state_dict())
    merged.merge(second.state_dict())
    assert torch.equal(merged.counts, whole.counts)
    fit = whole.fit()
    assert fit.thresholds[0] == fit.global_threshold
    assert fit.thresholds[1] != fit.global_threshold
    pooled_scores = torch.sigmoid(logits).numpy().reshape(-1)
    pooled_labels = targets.numpy().reshape(-1)
    pooled = f1_at(pooled_scores, pooled_labels, fit.global_threshold)
    assert exact_max_f1(pooled_scores, pooled_labels) - 0.005 <= pooled  # micro-F1 max over all decisions
    assert fit.as_class_thresholds([str(c) for c in range(6)], step=7).decide(torch.sigmoid(logits)).shape == (1200, 6)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="min_positives must be at least 1"):
        ThresholdCounts(3, min_positives=0)
    with pytest.raises(ValueError, match=r"must both be \(rows, 3\)"):
        ThresholdCounts(3, min_positives=1).add(torch.zeros(2, 4), torch.zeros(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match=r"one image id per row \(ids \(3,\)\)"):
        ThresholdCounts(3, min_positives=1).add(torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(3))
    assert fit_thresholds(torch.zeros(2, 2, BINS, dtype=torch.int32), 1).mean_f1() is None  # no positives at all


def test_the_reported_f1_is_held_out_each_half_scored_by_thresholds_fitted_on_the_other() -> None:
    """threshold_mean_f1 is what thresholds do on images they were not fitted on: two halves by a hash of the image
    id, each half's binned thresholds (the fit tested above) scored exactly on the other half, counts pooled."""
    logits, targets = synthetic(4000, 8, seed=3)
    ids = torch.arange(10_000, 14_000)  # dataset-wide ids, not row numbers
    counts = ThresholdCounts(8, min_positives=5)
    counts.add(logits, targets, ids)
    fit = counts.fit()
    assert fit.thresholds == fit_thresholds(counts.counts.sum(0), 5).thresholds  # prediction's: every image
    half = ((ids.numpy().astype(np.int64) * 2654435761) % 2**32) >> 31  # Knuth's hash, written out again
    assert 0.45 < half.mean() < 0.55
    probabilities, labels = torch.sigmoid(logits).numpy(), targets.numpy().astype(np.int64)
    true_pos, false_pos, positives = np.zeros(8), np.zeros(8), np.zeros(8)
    for fitted_on in (0, 1):
        part = ThresholdCounts(8, min_positives=5)
        part.add(logits[half == fitted_on], targets[half == fitted_on], ids[half == fitted_on])
        thresholds = np.array(fit_thresholds(part.counts.sum(0), 5).thresholds)
        scored = half != fitted_on
        predicted = probabilities[scored] >= thresholds
        true_pos += (predicted & (labels[scored] == 1)).sum(0)
        false_pos += (predicted & (labels[scored] == 0)).sum(0)
        positives += labels[scored].sum(0)
    assert fit.held_out_f1 == pytest.approx((2 * true_pos / (true_pos + false_pos + positives)).tolist(), abs=1e-9)
    assert fit.mean_held_out_f1() == pytest.approx(np.mean(fit.held_out_f1))


def test_in_sample_f1_is_optimistic_where_scores_say_nothing() -> None:
    """Scores independent of the labels: the in-sample max F1 finds a threshold that fits noise, the held-out F1
    does not keep it."""
    g = torch.Generator().manual_seed(4)
    targets = (torch.rand(1000, 20, generator=g) < 0.05).float()
    logits = torch.randn(1000, 20, generator=g)
    counts = ThresholdCounts(20, min_positives=5)
    counts.add(logits, targets, torch.arange(1000))
    fit = counts.fit()
    assert fit.mean_f1() > fit.mean_held_out_f1() + 0.02
