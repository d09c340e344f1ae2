"""The per-class thresholds file: round trip through storage, decisions, and refusals that name the problem."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.thresholds import ClassThresholds, ThresholdsError, read_thresholds, write_thresholds


def example() -> ClassThresholds:
    return ClassThresholds(classes=["cat", "dog", "owl"], thresholds=[0.5, 0.2, 0.3], global_threshold=0.3,
                           min_positives=5, step=600, positives=[9, 7, 1], f1=[0.8, 0.6, 0.3])


def test_round_trip_through_storage(tmp_path) -> None:
    url = str(tmp_path / "run" / "thresholds.json")
    write_thresholds(url, example())
    assert read_thresholds(url) == example()
    assert json.loads((tmp_path / "run" / "thresholds.json").read_text())["format"] == "xception-pipeline-thresholds"


def test_decide_applies_each_class_threshold() -> None:
    probabilities = torch.tensor([[0.5, 0.1, 0.29], [0.49, 0.2, 0.9]])
    assert example().decide(probabilities).tolist() == [[True, False, False], [False, True, True]]
    with pytest.raises(ThresholdsError, match="scores for 2 classes, thresholds for 3"):
        example().decide(probabilities[:, :2])


def test_refuses_other_formats_and_inconsistent_lengths(tmp_path) -> None:
    url = str(tmp_path / "other.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ThresholdsError, match=r"other\.json: not a thresholds file"):
        read_thresholds(url)
    with pytest.raises(ThresholdsError, match="3 classes but 2 thresholds"):
        ClassThresholds(classes=["a", "b", "c"], thresholds=[0.1, 0.2], global_threshold=0.5, min_positives=1)
    with pytest.raises(ThresholdsError, match=r"probabilities in \[0, 1\]"):
        ClassThresholds(classes=["a"], thresholds=[1.5], global_threshold=0.5, min_positives=1)
