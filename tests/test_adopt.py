"""Shards written by other tools (webdataset.ShardWriter), indexed in place and read by the real loader."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import webdataset as wds
from conftest import DemoShards
from PIL import Image
from test_checkpoint import tiny_config
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.checkpoint.format import committed_checkpoints
from pipeline.config import AugmentConfig, DataConfig, IndexConfig
from pipeline.data.adopt import AdoptError, index_shards
from pipeline.data.format import SampleFormat, read_classes, read_manifest
from pipeline.data.loading import ShardStream, decode_image
from pipeline.storage import join_url, list_dir, upload_file
from pipeline.train.loop import train

JOB = Path(__file__).resolve().parents[1] / "jobs/index_shards.py"
NAMES = ["cat", "dog", "emu", "fox", "gnu"]
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image(n: int, ext: str, size: int = 80) -> bytes:
    """A distinct image per n (lossless formats keep it exact; webp is written lossless too)."""
    pixels = np.random.default_rng(n).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=FORMATS[ext], **({"lossless": True} if ext == "webp" else {}))
    return out.getvalue()


def labels_of(n: int) -> list[int]:
    return sorted({n % 5, (2 * n + 1) % 5})


def write_foreign(folder: Path, samples: list[dict], maxcount: int, name: str = "part") -> list[Path]:
    """Samples written by webdataset's own ShardWriter, `maxcount` per tar."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=maxcount, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return sorted(folder.glob(f"{name}-*.tar"))


def flavour_sample(n: int, flavour: str, ext: str) -> dict:
    """Sample n with its labels the way `flavour` keeps them, and a key with dots (webdataset: key = up to the
    first dot, so the members become `crop.v1.<ext>`)."""
    ids = labels_of(n)
    label = {"cls": {"cls": ids[0]},
             "json_ids": {"json": {"label": ids, "caption": "x"}},
             "json_names": {"json": {"label": [NAMES[i] for i in ids]}},
             "txt_names": {"txt": "\n".join(NAMES[i] for i in ids)}}[flavour]
    return {"__key__": f"img{n:04d}.crop.v1", ext: image(n, ext), **label}


MAPPINGS = {"cls": ["index.labels=cls"], "json_ids": ["index.labels=json", "index.json_field=label"],
            "json_names": ["index.labels=json", "index.json_field=label"], "txt_names": ["index.labels=txt"]}


def index_config(*overrides: str) -> IndexConfig:
    from pipeline.config import load_config

    return load_config("demo", ["index.progress=false", "index.workers=4", *overrides]).index


def eval_stream(prefix: str, batch_size: int = 8, **data: object) -> ShardStream:
    return ShardStream(prefix, DataConfig(image_size=80, loader_workers=0, **data), batch_size=batch_size, rank=0,
                       world_size=1, train=False)


def read_back(prefix: str, **data: object) -> tuple[dict[str, list[str]], dict[str, torch.Tensor], ShardStream]:
    """Every sample the loader yields: key -> class names (via classes.tsv), key -> decoded pixels."""
    names = [c.name for c in read_classes(prefix, read_manifest(prefix))]
    stream = eval_stream(prefix, **data)
    labels, pixels = {}, {}
    for batch in stream:
        for i in range(len(batch)):
            if batch.valid[i]:
                labels[batch.keys[i]] = [names[c] for c in batch.labels(i)]
                pixels[batch.keys[i]] = batch.images[i].clone()
    return labels, pixels, stream


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize("flavour", ["cls", "json_ids", "json_names", "txt_names"])
def test_each_label_flavour_and_image_format_indexed_and_read_back_sample_by_sample(tmp_path, flavour, ext):
    write_foreign(tmp_path, [flavour_sample(n, flavour, ext) for n in range(14)], maxcount=5)

    report = index_shards(str(tmp_path), None, index_config(*MAPPINGS[flavour]))

    manifest = read_manifest(str(tmp_path))
    assert [(s.url, s.samples) for s in manifest.shards] == [(f"part-00000{i}.tar", c) for i, c in enumerate([5, 5, 4])]
    assert manifest.version == 2 and manifest.sample_format.labels == flavour.split("_")[0]
    assert manifest.sample_format.values == ("names" if flavour.endswith("names") else "ids")
    assert report.walked == 3 and not report.bad
    labels, pixels, stream = read_back(str(tmp_path))
    for n in range(14):  # sample by sample: the right labels and the right image under the webdataset key
        key = f"img{n:04d}"
        expected = labels_of(n)[:1] if flavour == "cls" else labels_of(n)
        if flavour.endswith("names"):
            assert sorted(labels[key]) == sorted(NAMES[i] for i in expected), key
        else:
            assert labels[key] == [str(i) for i in expected], key  # ids name themselves without a classes file
        own = decode_image(image(n, ext), 80, AugmentConfig(), train=False, rng=random.Random(0))
        assert torch.equal(pixels[key], own), key  # this sample's own image, not a neighbour's
    assert len(labels) == 14 and stream.metrics()["skipped"] == 0
    counted = {c.name: c.train_frequency for c in read_classes(str(tmp_path), manifest)}
    per_class = [sum(1 for n in range(14) if i in (labels_of(n)[:1] if flavour == "cls" else labels_of(n)))
                 for i in range(5)]
    assert sorted(counted.values(), reverse=True) == sorted(per_class, reverse=True)


def test_the_images_the_loader_decodes_are_the_ones_under_each_key(tmp_path):
    """Pixel-exact check against an independent decode for the lossless formats (a centre crop of the full size
    leaves nothing to resampling): the loader picks each sample's own image."""
    samples = [flavour_sample(n, "cls", "png" if n % 2 else "webp") for n in range(6)]
    write_foreign(tmp_path, samples, maxcount=3)
    index_shards(str(tmp_path), None, index_config("index.labels=cls"))
    stream = ShardStream(str(tmp_path), DataConfig(image_size=80, loader_workers=0,
                                                   augment=AugmentConfig(eval_crop_fraction=1.0)),
                         batch_size=6, rank=0, world_size=1, train=False)
    batch = next(iter(stream))
    for i, key in enumerate(batch.keys):
        n = int(key[3:])
        full = np.asarray(Image.open(io.BytesIO(image(n, "png"))).convert("RGB"))
        side = 80
        left = (full.shape[1] - side) // 2
        np.testing.assert_array_equal(batch.images[i].permute(1, 2, 0).numpy(), full[:, left:left + side], key)


class FetchCounter:
    """Counts the bytes s3fs's ranged GETs return (wraps S3File._fetch_range), independent of the indexer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes, self.requests, self._lock = 0, 0, threading.Lock()
        original = s3fs.core.S3File._fetch_range

        def counted(file, start, end):
            data = original(file, start, end)
            with self._lock:
                self.bytes += len(data)
                self.requests += 1
            return data

        monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)


def upload_folder(folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        upload_file(str(path), join_url(prefix, path.name))


def test_s3_index_reads_a_small_fraction_of_big_image_shards_and_the_loader_reads_them_from_elsewhere(
        tmp_path, s3_prefix, monkeypatch):
    big = [{"__key__": f"big{n:03d}", "png": image(n, "png", size=512), "cls": n % 3} for n in range(10)]
    write_foreign(tmp_path / "src", big, maxcount=5)
    upload_folder(tmp_path / "src", f"{s3_prefix}/readonly")
    counter = FetchCounter(monkeypatch)

    report = index_shards(f"{s3_prefix}/readonly", f"{s3_prefix}/index", index_config("index.labels=cls"))

    total = sum(s.bytes for s in report.scans)
    assert total > 7_500_000 and report.manifest.num_samples == 10
    assert counter.bytes < 0.05 * total, (counter.bytes, total)  # ~one 16 KiB read per 790 KB image
    assert sum(s.bytes_read for s in report.scans) == counter.bytes  # the indexer's own count agrees
    print(f"\nread {counter.bytes:,} of {total:,} bytes ({counter.bytes / total:.1%}) in {counter.requests} GETs")
    manifest = read_manifest(f"{s3_prefix}/index")
    assert [s.url for s in manifest.shards] == [f"{s3_prefix}/readonly/part-00000{i}.tar" for i in range(2)]
    assert sorted(list_dir(f"{s3_prefix}/readonly")) == [f"{s3_prefix}/readonly/part-00000{i}.tar" for i in range(2)]
    labels = {}
    for batch in eval_stream(f"{s3_prefix}/index", batch_size=5):
        labels.update({batch.keys[i]: batch.labels(i) for i in range(len(batch))})
    assert labels == {f"big{n:03d}": [n % 3] for n in range(10)}


def write_wids(path: Path, shards: list[tuple[str, int]], **extra: object) -> None:
    body = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "foreign",
            "shardlist": [{"url": url, "nsamples": n, "filesize": 0} for url, n in shards], **extra}
    path.write_text(json.dumps(body))


def test_a_wids_index_names_the_shards_relative_to_itself_and_its_counts_can_spare_opening_them(tmp_path, caplog):
    write_foreign(tmp_path / "data" / "shards", [flavour_sample(n, "cls", "jpg") for n in range(9)], maxcount=4)
    write_wids(tmp_path / "data" / "index.json", [(f"shards/part-00000{i}.tar", c) for i, c in enumerate([4, 4, 1])])

    report = index_shards(str(tmp_path / "data" / "index.json"), None, index_config("index.labels=cls"))

    manifest = read_manifest(str(tmp_path / "data"))
    assert [(s.url, s.samples) for s in manifest.shards] == [
        ("shards/part-000000.tar", 4), ("shards/part-000001.tar", 4), ("shards/part-000002.tar", 1)]
    assert report.walked == 3 and sum(c.train_frequency for c in report.classes) == 9  # labels read for counts
    labels, _, _ = read_back(str(tmp_path / "data"))
    assert labels == {f"img{n:04d}": [str(labels_of(n)[0])] for n in range(9)}

    # frequencies skipped: the index's counts stand, no tar is opened (a count the tars would contradict is kept)
    write_wids(tmp_path / "other.json", [("part-000000.tar", 4), ("part-000001.tar", 4), ("part-000002.tar", 1)],
               base="data/shards")
    skipped = index_shards(str(tmp_path / "other.json"), str(tmp_path / "skip"),
                           index_config("index.labels=cls", "index.frequencies=skip", "index.num_classes=5"))
    assert skipped.walked == 0 and sum(s.bytes_read for s in skipped.scans) == 0
    assert [s.url for s in skipped.manifest.shards] == [str(tmp_path / f"data/shards/part-00000{i}.tar")
                                                         for i in range(3)]
    assert [c.train_frequency for c in skipped.classes] == [0] * 5
    labels, _, _ = read_back(str(tmp_path / "skip"))
    assert len(labels) == 9

    # a wrong count is corrected from the tar, with a warning naming the shard
    write_wids(tmp_path / "data" / "wrong.json", [("shards/part-000000.tar", 7)])
    with caplog.at_level(logging.WARNING):
        fixed = index_shards(str(tmp_path / "data" / "wrong.json"), str(tmp_path / "wrong"),
                             index_config("index.labels=cls"))
    assert fixed.manifest.shards[0].samples == 4
    assert "part-000000.tar: the wids index says 7 samples, the tar holds 4" in caplog.text


def index_job():
    spec = importlib.util.spec_from_file_location("index_shards", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_wrong_mapping_fails_naming_shard_and_key_and_a_few_bad_samples_are_skipped_and_counted(
        tmp_path, capsys, caplog):
    write_foreign(tmp_path / "a", [flavour_sample(n, "json_names", "jpg") for n in range(6)], maxcount=3)
    main = index_job()

    assert main(["--shards", str(tmp_path / "a"), "index.labels=json", "index.json_field=labels",
                 "index.progress=false"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: AdoptError: 6 of 6 samples read so far are unusable")
    assert f"{tmp_path / 'a'}/part-000000.tar key img0000: bad_label: no field 'labels' in the JSON (fields: " \
           "label)" in error

    (tmp_path / "names.txt").write_text("\n".join(NAMES[:4]) + "\n")  # "gnu" is missing
    with pytest.raises(AdoptError, match=r"part-00000\d.tar key img000\d: bad_label: class 'gnu' is not in the "
                                         r"classes file .*names.txt \(4 classes\)"):
        index_shards(str(tmp_path / "a"), None, index_config("index.labels=json", "index.json_field=label",
                                                             f"index.classes={tmp_path / 'names.txt'}"))

    # below index.max_bad_fraction: indexed, and the loader skips and counts them, naming shard and key
    samples = [flavour_sample(n, "json_names", "jpg") for n in range(20)]
    del samples[3]["jpg"]
    samples[7]["json"] = {"label": ["cat", "zebra"]}
    write_foreign(tmp_path / "b", samples, maxcount=10)
    (tmp_path / "all.txt").write_text("\n".join(NAMES) + "\n")
    assert main(["--shards", str(tmp_path / "b"), "index.labels=json", "index.json_field=label",
                 f"index.classes={tmp_path / 'all.txt'}", "index.max_bad_fraction=0.2", "index.progress=false"]) == 0
    assert "bad samples (skipped by the loader): 2 (bad_image=1, bad_label=1)" in capsys.readouterr().out
    assert [c.name for c in read_classes(str(tmp_path / "b"), read_manifest(str(tmp_path / "b")))] == NAMES
    with caplog.at_level(logging.WARNING):
        labels, _, stream = read_back(str(tmp_path / "b"), max_bad_fraction=0.2)
    assert len(labels) == 18 and "img0003" not in labels and "img0007" not in labels
    metrics = stream.metrics()
    assert metrics["skipped_bad_image"] == 1 and metrics["skipped_bad_label"] == 1
    assert f"skipping sample {tmp_path / 'b'}/part-000000.tar key img0007: bad_label: label 'zebra' is not a " \
           "class name" in caplog.text


def test_a_prefix_holding_the_projects_own_dataset_is_refused(tiny_demo):
    with pytest.raises(AdoptError, match=r"already holds a manifest\.json not written by this indexer"):
        index_shards(tiny_demo.train, None, index_config("index.labels=json", "index.json_field=labels"))


def original_samples(prefix: str) -> list[dict]:
    """The demo's samples as stored in its own shards (manifest order)."""
    out = []
    for url in read_manifest(prefix).shard_urls(prefix):
        with open(url, "rb") as stream:
            out += list(group_by_keys({**f, "__url__": url} for f in tar_file_iterator(stream)))
    return out


@pytest.fixture(scope="module")
def foreign_demo(tiny_demo, tmp_path_factory) -> DemoShards:
    """The tiny demo's training shards rewritten by webdataset.ShardWriter as foreign shards (the same JPEG bytes,
    40 per tar, labels as class names in a JSON field), indexed with the demo's classes.tsv."""
    names = [c.name for c in read_classes(tiny_demo.train, read_manifest(tiny_demo.train))]
    folder = tmp_path_factory.mktemp("foreign-demo")
    write_foreign(folder, [{"__key__": s["__key__"], "jpg": s["jpg"],
                            "json": {"tags": [names[i] for i in json.loads(s["json"])["labels"]], "source": "demo"}}
                           for s in original_samples(tiny_demo.train)], maxcount=40, name="laion")
    index_shards(str(folder), None, index_config("index.labels=json", "index.json_field=tags",
                                                 f"index.classes={tiny_demo.train}/classes.tsv"))
    return DemoShards(train=str(folder), eval=tiny_demo.eval, num_classes=tiny_demo.num_classes)


def batches(prefix: str, rank: int, count: int, state: dict | None = None) -> tuple[list, dict]:
    stream = ShardStream(prefix, DataConfig(image_size=80, loader_workers=2, shuffle_buffer=16), batch_size=8,
                         rank=rank, world_size=2, train=True)
    if state is not None:
        stream.load_state_dict(state)
    out = []
    with contextlib.closing(iter(stream)) as items:
        for _ in range(count):
            batch = next(items)
            out.append((batch.keys, batch.images.clone(), [batch.labels(i) for i in range(len(batch))],
                        batch.epoch))
    return out, stream.state_dict()


def test_foreign_demo_shards_give_the_projects_batches_and_train(tiny_demo, foreign_demo, tmp_path):
    """The strongest check: same class list and frequencies, then the same batches (keys, pixels, labels) in the
    same order on each of 2 ranks, across an epoch boundary and after a resume; then training runs on them."""
    own, foreign = read_manifest(tiny_demo.train), read_manifest(foreign_demo.train)
    assert [s.samples for s in foreign.shards] == [s.samples for s in own.shards]
    assert read_classes(foreign_demo.train, foreign) == read_classes(tiny_demo.train, own)  # frequencies included
    per_epoch = ShardStream(tiny_demo.train, DataConfig(image_size=80, loader_workers=2, shuffle_buffer=16),
                            batch_size=8, rank=0, world_size=2, train=True).batches_per_epoch()
    for rank in range(2):
        expected, _ = batches(tiny_demo.train, rank, per_epoch + 2)
        got, state = batches(foreign_demo.train, rank, per_epoch - 3)
        resumed, _ = batches(foreign_demo.train, rank, 5, state)
        for want, have in zip(expected, got + resumed, strict=True):
            assert want[0] == have[0] and want[2] == have[2] and want[3] == have[3]
            assert torch.equal(want[1], have[1])  # byte-identical JPEGs decode to identical pixels

    config = tiny_config(foreign_demo, tmp_path, "train.total_steps=3", "checkpoint.every_steps=3",
                         "checkpoint.background=false")
    result = train(config)
    assert result["step"] == 3 and np.isfinite(result["loss"]) and result.get("skipped", 0) == 0
    assert committed_checkpoints(config.run_dir)[-1].step == 3


def test_sample_format_round_trips_and_refuses_impossible_mappings():
    fmt = SampleFormat(image=("webp",), labels="txt", values="names")
    assert SampleFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    with pytest.raises(ValueError, match=r"\.cls members hold class ids"):
        SampleFormat(labels="cls", values="names")
    with pytest.raises(ValueError, match="image extensions must be some of"):
        SampleFormat(image=("gif",))
