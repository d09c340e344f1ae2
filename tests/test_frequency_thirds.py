"""MAP@K of the head, middle and tail thirds of the classes by training frequency, against hand and NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluation.baselines import BaselineScorers
from pipeline.evaluation.frequency_thirds import FrequencyThirds
from pipeline.evaluation.map_metric import evaluate_map_at_k
from pipeline.evaluation.report import plot_frequency_thirds, thirds_table
from pipeline.evaluation.watcher import summarize


def test_thirds_rank_classes_by_frequency_with_ties_by_id():
    thirds = FrequencyThirds.of(torch.tensor([5.0, 1, 9, 1, 3, 7, 0]))
    # descending: 9 (class 2), 7 (5), 5 (0) | 3 (4), 1 (1) | 1 (3), 0 (6); the head takes the seventh class
    assert thirds.third.tolist() == [0, 1, 0, 2, 1, 0, 2]
    assert thirds.ranges() == {"head": [5.0, 9.0], "middle": [1.0, 3.0], "tail": [0.0, 1.0]}
    assert FrequencyThirds.of(torch.tensor([3.0, 1.0])).ranges()["tail"] is None  # fewer classes than thirds


def test_third_maps_and_counts_by_hand():
    thirds = FrequencyThirds.of(torch.tensor([5.0, 1, 9, 1, 3, 7, 0]))
    ap = torch.tensor([0.5, 0.2, 1.0, 0.0, 0.4, 0.3, 0.9], dtype=torch.float64)
    valid = torch.tensor([True, True, True, False, True, True, False])
    assert thirds.maps(ap, valid, None, 100) == pytest.approx(
        {"head_map@100": (0.5 + 1.0 + 0.3) / 3, "middle_map@100": (0.2 + 0.4) / 2, "tail_map@100": None})
    weights = torch.tensor([1.0, 3, 1, 1, 1, 2, 1], dtype=torch.float64)
    assert thirds.maps(ap, valid, weights, 5)["head_map@5"] == pytest.approx((0.5 + 1.0 + 2 * 0.3) / 4)
    assert thirds.maps(ap, valid, weights, 5)["middle_map@5"] == pytest.approx((3 * 0.2 + 0.4) / 4)
    assert thirds.counts(valid) == {"head_classes": 3, "head_classes_with_positives": 3, "middle_classes": 2,
                                    "middle_classes_with_positives": 2, "tail_classes": 2,
                                    "tail_classes_with_positives": 0}


def _numpy_ap_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """AP@K of one class, min-normalised: the paper's definition, written out with NumPy."""
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]  # descending score, ties by image index
    hits = relevant[order].astype(float)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((hits * precision).sum() / min(k, relevant.sum()))


def test_thirds_of_a_real_score_matrix_match_numpy_and_average_to_the_headline():
    rng = np.random.default_rng(0)
    frequency = np.floor(1000 / np.arange(1, 31) ** 1.2)  # a Zipf-like training frequency per class
    targets = rng.random((200, 30)) < np.linspace(0.3, 0.01, 30)
    scores = rng.normal(size=(200, 30)) + 2.0 * targets * np.linspace(1, 0, 30)  # common classes are easier
    result = evaluate_map_at_k(torch.tensor(scores), torch.tensor(targets), k=20)
    thirds = FrequencyThirds.of(torch.tensor(frequency))
    maps = thirds.maps(result.per_class_ap, result.class_valid, None, 20)
    for index, name in enumerate(("head", "middle", "tail")):
        classes = [c for c in range(30 * index // 3, 30 * (index + 1) // 3) if targets[:, c].any()]
        expected = np.mean([_numpy_ap_at_k(scores[:, c], targets[:, c], 20) for c in classes])
        assert maps[f"{name}_map@20"] == pytest.approx(expected, abs=1e-12)
    counts = thirds.counts(result.class_valid)
    evaluated = [counts[f"{t}_classes_with_positives"] for t in ("head", "middle", "tail")]
    headline = sum(n * maps[f"{t}_map@20"] for n, t in zip(evaluated, ("head", "middle", "tail"), strict=True))
    assert headline / sum(evaluated) == pytest.approx(result.map_at_k)
    assert maps["head_map@20"] > maps["tail_map@20"]


def test_baselines_get_their_thirds_and_the_summary_table_and_plot_show_them():
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    prior = targets.sum(0).double()
    scorers = BaselineScorers.for_prior(prior, 2)
    scorers.update(targets, torch.arange(4))
    thirds = FrequencyThirds.of(prior)
    baselines = scorers.compute(None, thirds)
    # per class the prior ties every image, ranked by id: class 0's top 2 (images 0, 1) hold one hit at rank 1
    assert baselines["prior"]["head_map@2"] == pytest.approx(1 / 2)
    assert set(baselines["random"]) == {"map@2", "image_map@2", "head_map@2", "middle_map@2", "tail_map@2"}
    record = {"step": 5, "k": 2, "map@2": 0.75, "image_map@2": 0.9, "baselines": baselines,
              **thirds.scalars(torch.tensor([1.0, 0.5, 0.75]), torch.ones(3, dtype=torch.bool), None, 2)}
    line = summarize(record, 2)
    assert line.endswith("; by training frequency head/middle/tail 100.0% / 50.0% / 75.0% (1 / 1 / 1 classes; "
                         f"class prior {100 * baselines['prior']['head_map@2']:.1f}% / "
                         f"{100 * baselines['prior']['middle_map@2']:.1f}% / "
                         f"{100 * baselines['prior']['tail_map@2']:.1f}%)"), line
    html = thirds_table(record, 2)
    assert "<td>tail</td><td>1</td><td>1</td><td>1</td><td>75.00%</td>" in html
    assert plot_frequency_thirds([record], 2).startswith(b"\x89PNG")
    assert plot_frequency_thirds([{"step": 1, "map@2": 0.5}], 2) is None and thirds_table({"map@2": 0.5}, 2) == ""
