"""The demo dataset: labels match what is drawn, classes are long-tailed, eval is dense, generation is reproducible.

Both variants are always tested: the "tiny" one needs Pillow + NumPy only, the real-art "openmoji" one the asset
packages of the `demo` extra, which the `test` extra includes (a missing asset fails the test, it is not skipped:
a green run must mean the demo users get was checked).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.data.demo import DemoAssetsMissing, DemoDataset, DemoSample, open_demo
from pipeline.data.demo.openmoji import build_annotations, read_annotations
from pipeline.data.demo.shapes import COLOURS

TINY_SIZE = 96
OPENMOJI_SIZE = 160  # smaller than the default 320 to keep the tests fast; the composition is the same


@pytest.fixture(scope="module")
def tiny() -> DemoDataset:
    return open_demo("tiny", image_size=TINY_SIZE)


@pytest.fixture(scope="module")
def openmoji() -> DemoDataset:
    try:
        return open_demo("openmoji", image_size=OPENMOJI_SIZE)
    except DemoAssetsMissing as exc:
        pytest.fail(f"openmoji demo assets not installed (pip install -e '.[test]' brings them): {exc}")


@pytest.fixture(params=["tiny", "openmoji"])
def dataset(request: pytest.FixtureRequest) -> DemoDataset:
    return request.getfixturevalue(request.param)


def _check_sample(ds: DemoDataset, s: DemoSample, split: str) -> None:
    assert s.labels == sorted(set(s.labels)) and s.labels, s.key
    assert all(isinstance(label, int) and 0 <= label < ds.num_classes for label in s.labels)
    catalog = {o.key: o for o in ds.objects}
    dense: set[int] = set()
    for obj in s.meta["objects"]:
        assert obj["labels"] == list(catalog[obj["object"]].labels)  # the placed object's own labels
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 < x1 <= ds.image_size and 0 <= y0 < y1 <= ds.image_size
        assert obj["visible"] >= ds.config.min_visible  # "mostly visible": its labels are really depicted
        dense.update(obj["labels"])
    if split == "eval":
        assert s.labels == sorted(dense)  # dense: every label of every placed object, nothing else
    else:
        assert s.meta["dense_labels"] == sorted(dense)
        assert set(s.labels) <= dense  # sparse: a subset of the true labels, never an invented one
    json.dumps(s.meta)  # the shard writer stores meta as JSON


@pytest.mark.parametrize("split", ["train", "eval"])
def test_labels_match_objects_placed(dataset: DemoDataset, split: str) -> None:
    samples = list(dataset.samples(split, 40, seed=3))
    for s in samples:
        _check_sample(dataset, s, split)
    assert {s.meta["art"] for s in samples} == {dataset.artists[split].name}
    assert max(len(s.meta["objects"]) for s in samples) > 1  # scenes really are multi-object


def test_tiny_objects_are_drawn_where_the_boxes_say(tiny: DemoDataset) -> None:
    """A solid object's colour dominates its box (so the labels describe pixels, not just metadata)."""
    checked = 0
    for s in tiny.samples("eval", 40, seed=5):
        pixels = np.asarray(Image.open(io.BytesIO(s.jpeg)), dtype=np.float32)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in s.meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            outside[y0:y1, x0:x1] = False
        for obj in s.meta["objects"]:
            _shape, colour, fill = obj["object"].split("-")
            if fill != "solid":
                continue
            x0, y0, x1, y1 = obj["box"]
            close = np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=np.float32), axis=2) < 60
            inside = close[y0:y1, x0:x1].mean()
            background = close[outside].mean() if outside.any() else 0.0
            assert inside > 0.1 and inside > 3 * background, (s.key, obj)
            checked += 1
    assert checked >= 10


def test_classes_are_well_formed(dataset: DemoDataset) -> None:
    assert [c.id for c in dataset.classes] == list(range(dataset.num_classes))
    assert len({c.name for c in dataset.classes}) == dataset.num_classes
    assert {c.kind for c in dataset.classes} == {"group", "subgroup", "tag"}
    assert all(c.name.startswith(c.kind + ":") for c in dataset.classes)
    assert json.dumps(dataset.describe())


def test_openmoji_has_many_classes_and_credits_its_sources(openmoji: DemoDataset) -> None:
    assert openmoji.num_classes >= 500
    assert len(openmoji.objects) > 3000
    assert "OpenMoji" in openmoji.attribution and "Twemoji" in openmoji.attribution
    assert openmoji.artists["train"].name == "openmoji" and openmoji.artists["eval"].name == "twemoji"
    fewer = open_demo("openmoji", image_size=OPENMOJI_SIZE, min_tag_count=20)
    assert fewer.num_classes < openmoji.num_classes  # rarer tags are dropped, groups and subgroups stay
    same_art = open_demo("openmoji", image_size=OPENMOJI_SIZE, eval_art="openmoji")
    assert same_art.artists["eval"].name == "openmoji" and "Twemoji" not in same_art.attribution


def test_a_small_openmoji_catalog_keeps_the_most_common_emoji_and_only_shared_classes() -> None:
    small = open_demo("openmoji", image_size=OPENMOJI_SIZE, catalog_size=100, min_tag_count=3, eval_artist="same")
    assert small.artists["eval"].name == "openmoji" and small.artists["train"].name == "openmoji"
    assert 90 <= len(small.objects) <= 100 and 20 <= small.num_classes <= 60
    shared = Counter(label for obj in small.objects for label in obj.labels)
    assert all(shared[c.id] >= 3 for c in small.classes) and all(obj.labels for obj in small.objects)
    # the most common base emoji: Zipf weights 1/rank, ranks 1..100 (one may be dropped for lack of a shared class)
    ranks = sorted(round(1 / obj.weight) for obj in small.objects)
    assert ranks[-1] <= 100 and len(set(ranks)) == len(ranks)
    tiny_same = open_demo("tiny", image_size=64, eval_artist="same")
    assert tiny_same.artists["eval"].name == tiny_same.artists["train"].name == "shapes-flat"


def _top_decile_share(ds: DemoDataset, samples: list[DemoSample]) -> float:
    freq = np.sort(np.bincount([label for s in samples for label in s.labels], minlength=ds.num_classes))[::-1]
    return float(freq[: max(1, ds.num_classes // 10)].sum() / freq.sum())


def test_tiny_class_frequencies_are_long_tailed(tiny: DemoDataset) -> None:
    samples = list(tiny.samples("eval", 300, seed=0))
    assert _top_decile_share(tiny, samples) > 0.4  # uniform would be ~0.1
    seen = np.bincount([label for s in samples for label in s.labels], minlength=tiny.num_classes)
    assert np.sort(seen)[-1] > 10 * max(1, np.median(seen))


def test_openmoji_class_frequencies_are_long_tailed(openmoji: DemoDataset) -> None:
    real = list(openmoji.samples("eval", 200, seed=0))
    assert _top_decile_share(openmoji, real) > 0.5
    seen = np.bincount([label for s in real for label in s.labels], minlength=openmoji.num_classes)
    assert (seen == 1).sum() > 50  # a real tail of classes seen once


def test_eval_labels_are_dense(dataset: DemoDataset) -> None:
    train = list(dataset.samples("train", 60, seed=1))
    sparse = np.mean([len(s.labels) for s in train])
    dense_same_scenes = np.mean([len(s.meta["dense_labels"]) for s in train])
    assert dense_same_scenes > 1.4 * sparse  # train_label_keep=0.5 drops about half the labels
    evals = np.mean([len(s.labels) for s in dataset.samples("eval", 60, seed=1)])
    assert evals > 1.4 * sparse
    keep_all = open_demo("tiny", image_size=TINY_SIZE, train_label_keep=1.0)
    for s in keep_all.samples("train", 10, seed=1):
        assert s.labels == s.meta["dense_labels"]


def test_same_seed_same_bytes_and_other_seed_differs(dataset: DemoDataset) -> None:
    a = list(dataset.samples("train", 6, seed=7))
    reopened = open_demo(dataset.name, image_size=dataset.image_size)
    b = list(reopened.samples("train", 6, seed=7))
    assert a == b
    c = list(dataset.samples("train", 6, seed=8))
    assert all(x.jpeg != y.jpeg for x, y in zip(a, c, strict=True))
    e = list(dataset.samples("eval", 6, seed=7))
    assert all(x.jpeg != y.jpeg for x, y in zip(a, e, strict=True))  # the splits are different scenes
    assert [s.key for s in a] == [f"train-{i:06d}" for i in range(6)]


def test_start_offset_resumes_the_same_stream(tiny: DemoDataset) -> None:
    full = list(tiny.samples("eval", 12, seed=11))
    assert list(tiny.samples("eval", 5, seed=11, start=7)) == full[7:]
    assert tiny.sample("eval", 3, seed=11) == full[3]


def test_parallel_generation_matches_sequential(tiny: DemoDataset) -> None:
    parallel = list(tiny.generate("train", 30, seed=2, start=4, workers=2, progress=False, chunk=8))
    assert parallel == list(tiny.samples("train", 30, seed=2, start=4))


def test_images_are_rgb_jpegs_of_the_configured_size(dataset: DemoDataset) -> None:
    for s in dataset.samples("eval", 4, seed=0):
        image = Image.open(io.BytesIO(s.jpeg))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (dataset.image_size, dataset.image_size)
    other = open_demo("tiny", image_size=48, jpeg_quality=50)
    small = next(other.samples("train", 1, seed=0))
    assert Image.open(io.BytesIO(small.jpeg)).size == (48, 48)


def test_bad_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="variant"):
        open_demo("nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="eval_art"):
        open_demo("tiny", eval_art="twemoji")
    with pytest.raises(ValueError, match="train_label_keep"):
        open_demo("tiny", train_label_keep=0.0)
    with pytest.raises(ValueError, match="image_size"):
        open_demo("tiny", image_size=4)
    ds = open_demo("tiny", image_size=32)
    with pytest.raises(ValueError, match="split"):
        ds.sample("test", 0, seed=0)  # type: ignore[arg-type]


def test_missing_assets_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data.demo import openmoji as module

    real = module.importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None if name == "resvg_py" else real(name))
    with pytest.raises(DemoAssetsMissing, match="resvg-py"):
        open_demo("openmoji")


def test_annotation_table_is_rebuilt_from_the_npm_package(tmp_path) -> None:
    entries = [
        {"hexcode": "1F44B", "group": "people-body", "subgroups": "hand-fingers-open", "annotation": "waving hand",
         "tags": "hand, wave, waving", "openmoji_tags": "hello, Wave", "skintone": "",
         "skintone_base_hexcode": "1F44B"},
        {"hexcode": "1F44B-1F3FF", "group": "people-body", "subgroups": "hand-fingers-open",
         "annotation": "waving hand: dark skin tone", "tags": "", "openmoji_tags": "", "skintone": 5,
         "skintone_base_hexcode": "1F44B"},
    ]
    tgz = tmp_path / "openmoji-9.9.9.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, body in (("package/package.json", {"version": "9.9.9"}), ("package/data/openmoji.json", entries)):
            data = json.dumps(body).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out1, out2 = tmp_path / "a.tsv.gz", tmp_path / "b.tsv.gz"
    assert build_annotations(tgz, out1) == 2 and build_annotations(tgz, out2) == 2
    assert out1.read_bytes() == out2.read_bytes()  # reproducible (no timestamp in the gzip header)
    version, rows = read_annotations(out1)
    assert version == "9.9.9"
    assert rows[0]["tags"] == "hand,wave,waving,hello" and rows[1]["skintone"] == "5"
    with gzip.open(out1, "rt") as f:
        assert "CC BY-SA 4.0" in f.readline()


def test_shipped_annotation_table_covers_openmoji() -> None:
    version, rows = read_annotations()
    assert version == "17.0.0" and len(rows) == 4495
    groups = {r["group"] for r in rows}
    assert len(groups) == 12 and len({r["subgroup"] for r in rows}) == 119
