"""The random and class-prior baselines: what they score, that shares merge exactly, and the per-eval-set cache."""

import numpy as np
import pytest
import torch

from pipeline.evaluation.baselines import BaselineScorers, random_scores, read_cached, write_cached
from pipeline.evaluation.map_at_k import map_at_k
from pipeline.evaluation.report import plot_map_curve
from pipeline.evaluation.watcher import summarize


def _targets(n=60, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    probability = torch.linspace(0.05, 0.6, c)  # long-tailed: class 7 is common, class 0 rare
    targets = (torch.rand(n, c, generator=g) < probability).float()
    targets[targets.sum(1) == 0, -1] = 1.0
    return targets


def test_prior_ranks_common_classes_first_for_every_image_and_ties_images_per_class():
    targets = _targets()
    prior = targets.sum(0).double()
    scorers = BaselineScorers.for_prior(prior, k=100)
    scorers.update(targets, torch.arange(len(targets)))
    result = scorers.compute(None)["prior"]
    # per image: a hand computation of AP@100 with the classes ranked by frequency, the same ranking for all images
    order = np.argsort(-prior.numpy(), kind="stable")
    aps = []
    for row in targets.numpy():
        rel = row[order]
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append((rel * precision).sum() / min(100, rel.sum()))
    assert abs(result["image_map@100"] - np.mean(aps)) < 1e-9
    # per class every image ties: ranked by image id, exactly as a constant score matrix
    constant = torch.ones_like(targets)
    assert abs(result["map@100"] - map_at_k(constant, targets)) < 1e-12


def test_random_scores_depend_only_on_the_image_so_shares_merge_to_one_pass():
    targets = _targets(n=50)
    ids = torch.arange(50)
    assert torch.equal(random_scores(ids[10:20], 8), random_scores(ids, 8)[10:20])
    whole = BaselineScorers.for_prior(targets.sum(0), k=100)
    whole.update(targets, ids)
    first, second = BaselineScorers.for_prior(targets.sum(0), k=100), BaselineScorers.for_prior(targets.sum(0), k=100)
    first.update(targets[:23], ids[:23])
    second.update(targets[23:], ids[23:])
    first.merge(second.state_dict())
    assert first.compute(None) == whole.compute(None)
    # a worker's state rebuilt on the driver merges and computes without the prior
    rebuilt = BaselineScorers.from_state_dict(second.state_dict())
    assert BaselineScorers.for_prior(targets.sum(0), k=100).merge(rebuilt).compute(None) == second.compute(None)
    with pytest.raises(ValueError, match="rebuilt from a state"):
        rebuilt.update(targets[:1], ids[:1])
    # random per-class MAP sits near the class frequencies, far below a perfect scorer
    value = whole.compute(None)["random"]["map@100"]
    assert 0.1 < value < 0.7 and map_at_k(targets, targets) == 1.0


def test_cache_is_keyed_by_the_evaluation_set(tmp_path):
    key = {"eval": "s3://b/eval", "eval_manifest_sha256": "abc", "k": 100}
    values = {"random": {"map@100": 0.1, "image_map@100": 0.2}, "prior": {"map@100": 0.1, "image_map@100": 0.5}}
    assert read_cached(str(tmp_path), key, None) is None
    write_cached(str(tmp_path), key, values, None)
    assert read_cached(str(tmp_path), key, None) == values
    assert read_cached(str(tmp_path), {**key, "eval_manifest_sha256": "def"}, None) is None
    write_cached(str(tmp_path), {**key, "k": 5}, values, None)
    assert read_cached(str(tmp_path), key, None) == values  # other keys kept beside it
    (tmp_path / "baselines.json").write_text("{torn")
    assert read_cached(str(tmp_path), key, None) is None  # recomputed, not fatal


def test_summary_and_curve_show_the_baselines():
    baselines = {"random": {"map@100": 0.05, "image_map@100": 0.1}, "prior": {"map@100": 0.06, "image_map@100": 0.4}}
    record = {"step": 10, "k": 100, "map@100": 0.5, "image_map@100": 0.8, "baselines": baselines}
    line = summarize(record)
    assert line == ("MAP@100 50.00% (class prior 6.00%, random 5.00%); "
                    "per image 80.00% (class prior 40.00%, random 10.00%)")
    assert "prior" not in summarize({**record, "baselines": None})
    assert summarize(record, orientation="image") == ("MAP@100 per image 80.00% (class prior 40.00%, random 10.00%); "
                                                      "per class 50.00% (class prior 6.00%, random 5.00%)")
    png = plot_map_curve([record, {**record, "step": 20}], 100)
    assert png.startswith(b"\x89PNG")
