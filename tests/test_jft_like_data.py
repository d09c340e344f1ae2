"""The JFT-like demo variant: combination classes, a Zipf tail, the stated label noise, dense exact eval labels.

Counted on a few hundred generated scenes (no shards, no model), so each property is checked against what the
module docstring promises; at 64 px a scene takes a few milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.demo import DemoDataset, open_demo, prepare_demo_data
from pipeline.data.demo.shapes import JFT_LIKE_FALSE_LABEL_RATE, JFT_LIKE_LABEL_KEEP
from pipeline.data.format import read_classes, read_manifest


@pytest.fixture(scope="module")
def jft() -> DemoDataset:
    return open_demo("jft_like", image_size=64, eval_artist="same")


def _names(ds: DemoDataset, labels: list[int]) -> set[str]:
    return {ds.classes[label].name for label in labels}


def test_classes_are_attributes_and_their_colour_shape_combinations(jft: DemoDataset) -> None:
    names = [c.name for c in jft.classes]
    assert len(names) == len(set(names)) == 115
    pairs = [n for n in names if n.startswith("pair:")]
    assert len(pairs) == 90
    for obj in jft.objects:  # a pair is labelled together with the attributes it binds
        fill, colour, shape = obj.name.split(" ")
        assert {f"colour:{colour}", f"shape:{shape}", f"fill:{fill}", f"pair:{colour} {shape}"} <= _names(
            jft, list(obj.labels))


def test_a_pair_is_true_only_where_one_object_has_both_attributes(jft: DemoDataset) -> None:
    unbound = 0
    for s in jft.samples("eval", 150, seed=0):
        names = _names(jft, s.labels)
        placed = {f"pair:{o['name'].split(' ', 1)[1]}" for o in s.meta["objects"]}
        assert {n for n in names if n.startswith("pair:")} == placed
        colours = {n.split(":")[1] for n in names if n.startswith("colour:")}
        shapes = {n.split(":")[1] for n in names if n.startswith("shape:")}
        unbound += sum(f"pair:{c} {h}" not in names for c in colours for h in shapes)
    assert unbound > 50  # attributes that co-occur without their pair: the pair is more than its parts


def test_pair_frequencies_follow_a_zipf_tail(jft: DemoDataset) -> None:
    shares: dict[str, float] = {}
    for obj in jft.objects:
        pair = obj.name.split(" ", 1)[1]
        shares[pair] = shares.get(pair, 0.0) + obj.weight
    ranked = np.sort(np.array(list(shares.values())))[::-1]
    np.testing.assert_allclose(ranked / ranked[0], 1.0 / np.arange(1, 91), rtol=1e-9)  # rank^-1: a 90x span
    seen = np.bincount([label for s in jft.samples("train", 400, seed=1) for label in s.labels],
                       minlength=jft.num_classes)
    pairs = np.sort(seen[25:])[::-1]
    assert pairs[0] > 20 * max(1, np.median(pairs))


def test_training_labels_drop_true_labels_and_add_a_few_false_ones(jft: DemoDataset) -> None:
    kept = total = dropped_objects_labels = 0
    false_images = 0
    train = list(jft.samples("train", 400, seed=2))
    for s in train:
        dense, labels = set(s.meta["dense_labels"]), set(s.labels)
        false = set(s.meta.get("false_labels", []))
        assert false.isdisjoint(dense) and false <= labels and len(false) <= 1
        assert labels - false <= dense  # everything else is true
        false_images += bool(false)
        kept += len((labels - false) & dense)
        total += len(dense)
        dropped_objects_labels += len(dense - labels)
    assert 0.8 * JFT_LIKE_FALSE_LABEL_RATE < false_images / len(train) < 1.3 * JFT_LIKE_FALSE_LABEL_RATE
    # per object a label survives with JFT_LIKE_LABEL_KEEP; an image loses a label only when every object carrying
    # it does
    missing = dropped_objects_labels / total
    assert 0.5 * (1 - JFT_LIKE_LABEL_KEEP) < missing < 1 - JFT_LIKE_LABEL_KEEP, missing


def test_eval_labels_are_dense_and_exact(jft: DemoDataset) -> None:
    for s in jft.samples("eval", 60, seed=3):
        assert "false_labels" not in s.meta
        assert s.labels == sorted({label for o in s.meta["objects"] for label in o["labels"]})


def test_same_seed_same_bytes(jft: DemoDataset) -> None:
    again = open_demo("jft_like", image_size=64, eval_artist="same")
    assert list(jft.samples("train", 5, seed=9)) == list(again.samples("train", 5, seed=9))
    assert open_demo("tiny").config.train_false_label_rate == 0  # the other variants stay omission-only


def test_prepared_as_a_demo_option_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config("demo", ["data.demo.variant=jft_like", "data.demo.train_images=16",
                                  "data.demo.eval_images=8", "data.demo.image_size=72",
                                  "data.demo.images_per_shard=8", f"data.demo.location={tmp_path}"])
    prepared = prepare_demo_data(config, workers=1)
    manifest = read_manifest(prepared.data.train)
    assert prepared.model.num_classes == manifest.num_classes == 115
    assert manifest.num_samples == 16 and read_manifest(prepared.data.eval).num_samples == 8
    assert sum(c.train_frequency for c in read_classes(prepared.data.train, manifest)) > 16
    monkeypatch.setattr("pipeline.data.demo.prepare.write_demo_shards", lambda *a, **k: pytest.fail("regenerated"))
    assert prepare_demo_data(config, workers=1).data.train == prepared.data.train  # cached
