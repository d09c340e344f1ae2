"""Shard writing: images + labels -> WebDataset tars, manifest, classes; image rules; resume; S3; the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageOps

from pipeline.config import ShardsConfig
from pipeline.data.format import ClassInfo, classes_from_tsv, classes_to_tsv, read_classes, read_manifest
from pipeline.data.writing import (
    LabelsFileError,
    Sample,
    ShardWriteError,
    ShardWriter,
    read_labels_file,
    write_folder_shards,
)
from pipeline.data.writing.images import BadImageError, prepare_image
from pipeline.data.writing.sizing import planned_shard_bytes, record_bytes, tar_bytes
from pipeline.storage import filesystem, open_read, require_bucket

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 64 * 1024  # the smallest shard target allowed: several shards from a few dozen small images
MAX_MB = MAX_BYTES / 2**20
SIDE, QUALITY = ShardsConfig().max_image_side, ShardsConfig().jpeg_quality


def _photo(seed: int, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients plus sensor-like noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * rng.uniform(2, 9) + c) * np.cos(y * rng.uniform(2, 9)) for c in (0, 1, 2)], -1)
    pixels = (base * 90 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ image rules


def test_prepare_image_passes_valid_rgb_jpeg_through_byte_identical() -> None:
    data = _encode(_photo(0, 120, 90), quality=80)
    prepared = prepare_image(data, max_image_side=512, jpeg_quality=QUALITY)
    assert prepared.jpeg == data and prepared.reencoded is None and (prepared.width, prepared.height) == (120, 90)


def test_prepare_image_converts_png_gray_cmyk_rotated_and_oversized_to_rgb_jpeg() -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 10))  # transparent corner -> white, not black
    cases = {
        "png": (_encode(rgba, "PNG"), (40, 30)),
        "gray": (_encode(_photo(1, 50, 40).convert("L")), (50, 40)),
        "cmyk": (_encode(_photo(2, 50, 40).convert("CMYK")), (50, 40)),
        "big": (_encode(_photo(3, 600, 300)), (128, 64)),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    cases["rotated"] = (_encode(_photo(4, 60, 40), exif=exif.tobytes()), (40, 60))
    for name, (data, size) in cases.items():
        prepared = prepare_image(data, max_image_side=128, jpeg_quality=85)
        image = Image.open(io.BytesIO(prepared.jpeg))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size), name
        assert prepared.reencoded and (prepared.width, prepared.height) == size, name
    png = Image.open(io.BytesIO(prepare_image(cases["png"][0], SIDE, QUALITY).jpeg))
    assert min(png.getpixel((2, 2))) > 240 and png.getpixel((30, 20))[0] > 240 > png.getpixel((30, 20))[1] + 100


def test_prepare_image_stores_every_exif_orientation_upright() -> None:
    quadrants = np.zeros((40, 60, 3), np.uint8)
    quadrants[:20, :30], quadrants[:20, 30:], quadrants[20:, :30] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _encode(Image.fromarray(quadrants), quality=95, exif=exif.tobytes())
        prepared = prepare_image(data, SIDE, QUALITY)
        assert (prepared.reencoded is None) == (orientation == 1), orientation
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), np.float32)
        stored = np.asarray(Image.open(io.BytesIO(prepared.jpeg)), np.float32)
        assert stored.shape == expected.shape and np.abs(stored - expected).mean() < 4, orientation


def test_prepare_image_rejects_truncated_and_non_images() -> None:
    data = _encode(_photo(5, 200, 150))
    with pytest.raises(BadImageError, match="truncated"):
        prepare_image(data[: len(data) // 2], SIDE, QUALITY)
    with pytest.raises(BadImageError, match="not a readable image"):
        prepare_image(b"just some text, not a JPEG\n", SIDE, QUALITY)
    with pytest.raises(BadImageError, match="empty"):
        prepare_image(b"", SIDE, QUALITY)


# ----------------------------------------------------------------------------------------------- folder source


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 photo-like JPEGs (pass-through), one each of PNG/gray/CMYK/oversized/rotated, two bad files, labels.csv."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "odd").mkdir()
    rows = ["path,labels,photographer"]
    names = ["cat", "dog", "tree", "car"]
    for i in range(30):
        rel = f"a/img.{i:03d}.jpg" if i % 2 else f"img {i:03d}.jpg"  # dots and spaces must not break keys
        (root / rel).write_bytes(_encode(_photo(100 + i, 96 + 8 * (i % 5), 72 + 6 * (i % 4)), quality=85))
        labels = [names[i % 4]] + (["tree"] if i % 3 == 0 else [])
        rows.append(f'"{rel}",{"|".join(labels)},p{i}')
    exif = Image.Exif()
    exif[0x0112] = 8
    odd = {
        "odd/logo.png": _encode(Image.new("RGBA", (64, 48), (0, 128, 255, 128)), "PNG"),
        "odd/gray.jpg": _encode(_photo(7, 80, 60).convert("L")),
        "odd/cmyk.jpg": _encode(_photo(8, 80, 60).convert("CMYK")),
        "odd/big.jpg": _encode(_photo(9, 900, 600), quality=90),
        "odd/rotated.jpg": _encode(_photo(10, 90, 60), exif=exif.tobytes()),
    }
    jpeg = _encode(_photo(11, 200, 150))
    odd["bad/truncated.jpg"] = jpeg[: len(jpeg) // 3]
    odd["bad/notes.jpg"] = b"this is a text file named .jpg\n"
    (root / "bad").mkdir()
    for rel, data in odd.items():
        (root / rel).write_bytes(data)
        rows.append(f"{rel},car;dog,someone")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _read_back(prefix: str) -> dict[str, tuple[bytes, dict]]:
    manifest = read_manifest(prefix)
    dataset = wds.WebDataset(manifest.shard_urls(prefix), shardshuffle=False)
    return {s["__key__"]: (s["jpg"], json.loads(s["json"])) for s in dataset}


def _files(prefix: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(prefix.iterdir())}


def test_folder_to_local_roundtrip(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    report = write_folder_shards(str(folder), str(folder / "labels.csv"), str(out),
                                 options=ShardsConfig(max_shard_mb=MAX_MB, workers=1, progress=False))
    # bad inputs are skipped and reported with their path
    assert {(Path(b.source).relative_to(folder).as_posix(), b.reason.split(" ")[0]) for b in report.bad} == {
        ("bad/truncated.jpg", "corrupt"), ("bad/notes.jpg", "not")}
    assert report.reencoded == {"format": 1, "mode": 2, "downscaled": 1, "exif": 1}
    manifest = read_manifest(str(out))
    assert manifest.num_samples == report.samples == 35 and manifest.labels == "sparse" and len(manifest.shards) >= 3
    for shard in manifest.shards:  # manifest counts and bytes equal the tars; the size target holds
        path = out / shard.url
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 2 * shard.samples and path.stat().st_size == shard.bytes <= MAX_BYTES
    assert sum(s.bytes for s in manifest.shards[:-1]) / (len(manifest.shards) - 1) > 0.7 * MAX_BYTES

    classes = read_classes(str(out), manifest)
    assert [c.name for c in classes] == ["dog", "tree", "car", "cat"]  # 15, 15, 14, 8 in labels.csv
    names = {c.id: c.name for c in classes}
    rows = {}
    for line in (folder / "labels.csv").read_text().splitlines()[1:]:
        rel, labels, _ = next(csv.reader([line]))
        rows[rel] = sorted(set(labels.replace(";", "|").split("|")))
    samples = _read_back(str(out))
    assert len(samples) == 35
    counts = {c.name: 0 for c in classes}
    for key, (jpg, meta) in samples.items():
        rel = meta["path"]
        assert "." not in key and sorted(names[i] for i in meta["labels"]) == rows[rel]
        for i in meta["labels"]:
            counts[names[i]] += 1
        image = Image.open(io.BytesIO(jpg))
        assert image.format == "JPEG" and image.mode == "RGB"
        if not rel.startswith("odd/"):
            assert jpg == (folder / rel).read_bytes() and meta["photographer"].startswith("p")
    assert {c.name: c.train_frequency for c in classes} == counts
    by_path = {meta["path"]: Image.open(io.BytesIO(jpg)).size for jpg, meta in samples.values()}
    assert by_path["odd/big.jpg"] == (512, 341) and by_path["odd/rotated.jpg"] == (60, 90)


def test_labels_file_formats_and_errors(tmp_path: Path) -> None:
    csv_file = tmp_path / "plain.csv"
    csv_file.write_text('x/a.jpg,cat|dog\n"b, c.jpg",dog; bird\n\nd.jpg,\n')
    records = read_labels_file(str(csv_file))
    assert [(r.path, r.labels, r.line) for r in records] == [
        ("x/a.jpg", ["cat", "dog"], 1), ("b, c.jpg", ["dog", "bird"], 2), ("d.jpg", [], 4)]
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text('{"path": "a.jpg", "labels": ["cat"], "source": "web"}\n\n{"path": "b.jpg", "labels": []}\n')
    assert [(r.path, r.labels, r.meta, r.line) for r in read_labels_file(str(jsonl))] == [
        ("a.jpg", ["cat"], {"source": "web"}, 1), ("b.jpg", [], {}, 3)]
    bad = {
        "three.csv": ("a.jpg,cat,dog\n", r"three.csv:1: expected 'path,labels'"),
        "dup.csv": ("a.jpg,cat\nb.jpg,dog\na.jpg,dog\n", r"dup.csv:3: image 'a.jpg' is listed again .*line 1"),
        "types.jsonl": ('{"path": "a.jpg", "labels": ["x"]}\n{"path": "b.jpg", "labels": [3]}\n', r"types.jsonl:2:"),
        "broken.jsonl": ('{"path": "a.jpg", "labels": ["x"]}\n{"path": \n', r"broken.jsonl:2: not valid JSON"),
        "labels.txt": ("a.jpg cat\n", r"labels.txt: unknown labels file type"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LabelsFileError, match=message):
            read_labels_file(str(tmp_path / name))


def test_given_vocabulary_keeps_training_ids_and_names_unknown_classes(folder: Path, tmp_path: Path) -> None:
    vocab = [ClassInfo(0, "tree", 50, 0.5), ClassInfo(1, "cat", 20), ClassInfo(2, "dog", 10), ClassInfo(3, "bird", 1)]
    labels = tmp_path / "eval.jsonl"
    lines = [{"path": f"a/img.{i:03d}.jpg", "labels": ["cat", "tree"] if i % 4 == 1 else ["dog"]} for i in (1, 3, 5)]
    labels.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "eval"
    report = write_folder_shards(str(folder), str(labels), str(out), vocabulary=vocab, labels="dense",
                                 options=ShardsConfig(workers=1, progress=False))
    assert report.samples == 3 and read_manifest(str(out)).labels == "dense"
    assert (out / "classes.tsv").read_text() == classes_to_tsv(vocab)  # ids, frequencies and weights kept
    assert {tuple(m["labels"]) for _, m in _read_back(str(out)).values()} == {(0, 1), (2,)}

    labels.write_text(labels.read_text() + json.dumps({"path": "a/img.007.jpg", "labels": ["dog", "zebra"]}) + "\n")
    with pytest.raises(LabelsFileError, match=r"eval.jsonl:4: unknown class 'zebra'.*4 classes"):
        write_folder_shards(str(folder), str(labels), str(tmp_path / "eval2"), vocabulary=vocab,
                            options=ShardsConfig(workers=1, progress=False))


def test_resume_rewrites_only_missing_shard_and_output_is_deterministic(folder: Path, tmp_path: Path) -> None:
    labels = str(folder / "labels.csv")
    first, second = tmp_path / "first", tmp_path / "second"
    write_folder_shards(str(folder), labels, str(first),
                        options=ShardsConfig(max_shard_mb=MAX_MB, workers=2, progress=False))
    write_folder_shards(str(folder), labels, str(second),
                        options=ShardsConfig(max_shard_mb=MAX_MB, workers=1, progress=False))
    expected = _files(first)
    assert expected == _files(second)  # same bytes whatever the number of worker processes

    (first / "manifest.json").unlink()
    (first / "shard-000001.tar").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.glob("shard-*.tar")}
    report = write_folder_shards(str(folder), labels, str(first),
                                 options=ShardsConfig(max_shard_mb=MAX_MB, workers=1, progress=False))
    assert report.written_shards == [1] and 1 not in report.skipped_shards and len(report.skipped_shards) >= 2
    assert {p.name: p.stat().st_mtime_ns for p in first.glob("shard-*.tar") if p.name in mtimes} == mtimes
    assert _files(first) == expected

    with pytest.raises(ShardWriteError, match=r"shard-000000.json: .*other settings"):
        write_folder_shards(str(folder), labels, str(first),
                            options=ShardsConfig(max_shard_mb=MAX_MB, jpeg_quality=70, workers=1, progress=False))


def test_a_first_run_against_the_wrong_folder_does_not_decide_the_rerun(folder: Path, tmp_path: Path) -> None:
    """The same labels file read against another folder gives the same keys: the folder and the labels file's
    content are what identify a shard's inputs, so shards that recorded every input as missing are rewritten, and
    good shards from another folder are refused unless shards.overwrite=true, which rewrites them all."""
    labels, out = str(folder / "labels.csv"), tmp_path / "mine"
    options = ShardsConfig(max_shard_mb=MAX_MB, workers=1, progress=False)
    with pytest.raises(ShardWriteError, match=r"none of the 37 inputs could be used \(first: .*file not found\)"):
        write_folder_shards(str(tmp_path / "fotos"), labels, str(out), options=options)  # a typo in --images
    assert list(out.glob("shard-*.json")) and not (out / "manifest.json").exists()
    report = write_folder_shards(str(folder), labels, str(out), options=options)  # the right folder
    assert report.samples == 35 and report.skipped_shards == [] and len(report.bad) == 2
    clean = tmp_path / "clean"
    write_folder_shards(str(folder), labels, str(clean), options=options)
    assert _files(out) == _files(clean)

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with pytest.raises(ShardWriteError, match=rf"shard-000000.json: this shard was written from other inputs "
                       rf"\(images {folder}, labels_sha256 .*\) than this run's \(images {copy},.*overwrite=true"):
        write_folder_shards(str(copy), labels, str(out), options=options)
    assert _files(out) == _files(clean)  # refused before anything was touched
    report = write_folder_shards(str(copy), labels, str(out), options=options.model_copy(update={"overwrite": True}))
    assert report.skipped_shards == [] and report.written_shards == list(range(len(report.shards)))
    assert read_manifest(str(out)).num_samples == 35

    (copy / "labels.csv").write_text((folder / "labels.csv").read_text().replace(",p0\n", ",p100\n"))
    with pytest.raises(ShardWriteError, match="other inputs"):  # the same folder, another labels file's content
        write_folder_shards(str(copy), str(copy / "labels.csv"), str(out), options=options)


def test_interrupted_source_leaves_only_complete_shards_and_resumes(tmp_path: Path) -> None:
    images = [(f"s{i:03d}", _encode(_photo(200 + i, 64, 48)), [i % 3]) for i in range(12)]
    classes = [ClassInfo(i, f"c{i}") for i in range(3)]
    options = ShardsConfig(max_shard_samples=4, workers=1, progress=False)

    def failing():
        for i, item in enumerate(images):
            if i == 10:
                raise ConnectionError("source went away")
            yield item

    out = tmp_path / "ds"
    with pytest.raises(ConnectionError):
        ShardWriter(str(out), classes, options=options).write(failing())
    assert sorted(p.name for p in out.iterdir()) == [f"shard-00000{i}.{e}" for i in (0, 1) for e in ("json", "tar")]
    report = ShardWriter(str(out), classes, options=options).write(images)
    assert report.skipped_shards == [0, 1] and report.written_shards == [2] and report.samples == 12
    clean = tmp_path / "clean"
    ShardWriter(str(clean), classes, options=options).write(iter(images))
    assert _files(out) == _files(clean)
    grown = [*images, ("s999", images[0][1], [0])]
    with pytest.raises(ShardWriteError, match=r"shard-000002.json: the input has more items \(next: 's999'\)"):
        ShardWriter(str(out), classes, options=options).write(grown)


def test_iterator_source_to_s3(s3_prefix: str) -> None:
    classes = [ClassInfo(i, f"class-{i}") for i in range(5)]
    samples = [Sample(key=f"gen-{i:04d}", labels=[i % 5, (i + 2) % 5], image=_encode(_photo(300 + i, 72, 56)),
                      meta={"index": i}) for i in range(9)]
    samples.append(Sample(key="gen-bad", labels=[0], image=b"\xff\xd8\xff not really"))
    report = ShardWriter(s3_prefix, classes, attribution="test art", labels="dense",
                         options=ShardsConfig(max_shard_samples=4, workers=1, progress=False)).write(iter(samples))
    assert [b.key for b in report.bad] == ["gen-bad"] and report.samples == 9
    manifest = read_manifest(s3_prefix)
    assert [s.samples for s in manifest.shards] == [4, 4, 1] and manifest.attribution == "test art"
    got = {}
    for url, shard in zip(manifest.shard_urls(s3_prefix), manifest.shards, strict=True):
        with open_read(url) as handle:
            data = handle.read()
        assert len(data) == shard.bytes
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                got[member.name] = tar.extractfile(member).read()
    for s in samples[:9]:
        assert got[f"{s.key}.jpg"] == s.image
        assert json.loads(got[f"{s.key}.json"]) == {"labels": sorted(s.labels), "index": s.meta["index"]}
    assert [c.train_frequency for c in read_classes(s3_prefix, manifest)] == [4, 3, 4, 4, 3]


# ----------------------------------------------------------------------------------- shard count and overwrite


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes, list[int]]]:
    """40 pass-through JPEGs of ~29 KB (1.1 MiB): one shard at the default 256 MiB target."""
    return [(f"p{i:03d}", _encode(_photo(400 + i, 320, 240), quality=90), [i % 3]) for i in range(40)]


def _sidecars(prefix: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(prefix.glob("shard-*.json"))]


def _record_bytes(prefix: Path) -> int:
    """The tar record bytes of every sample in the shards (headers + 512-byte padded members): what the plan sizes."""
    total = 0
    for path in prefix.glob("shard-*.tar"):
        with tarfile.open(path) as tar:
            total += sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers())
    return total


def test_min_shards_splits_a_small_dataset_above_the_floor(photos: list, tmp_path: Path) -> None:
    classes = [ClassInfo(i, f"c{i}") for i in range(3)]
    out = tmp_path / "eight"
    report = ShardWriter(str(out), classes, options=ShardsConfig(min_shards=8, min_shard_mb=1 / 16, workers=1,
                                                                  progress=False)).write(photos)
    target = -(-_record_bytes(out) // 8)  # exact for pass-through JPEGs
    assert {s["target_bytes"] for s in _sidecars(out)} == {target}
    manifest = read_manifest(str(out))
    assert 8 <= len(manifest.shards) <= 10 and manifest.num_samples == 40
    assert all(s.bytes <= target for s in manifest.shards)
    assert manifest.extra["writer"]["min_shards"] == 8
    n = len(manifest.shards)
    sizes = f"cluster.num_workers x data.loader_workers = {n} x 1, {n // 2} x 2, {n // 4} x 4, 1 x 8"
    assert sizes in report.summary()

    floor = tmp_path / "floor"  # 40 x 29 KB / 8 is below a 0.5 MiB floor: 3 shards of <= 0.5 MiB instead
    ShardWriter(str(floor), classes, options=ShardsConfig(min_shards=8, min_shard_mb=0.5, workers=1,
                                                          progress=False)).write(photos)
    assert {s["target_bytes"] for s in _sidecars(floor)} == {2**19}
    shards = read_manifest(str(floor)).shards
    assert len(shards) == 3 and all(0.9 * 2**19 < s.bytes <= 2**19 for s in shards[:-1])

    expected = _files(out)  # resume: the published shards' target is kept, the output identical
    (out / "manifest.json").unlink()
    (out / "shard-000002.tar").unlink()
    ShardWriter(str(out), classes, options=ShardsConfig(min_shards=8, min_shard_mb=1 / 16, workers=1,
                                                        progress=False)).write(photos)
    assert _files(out) == expected

    whole = tmp_path / "whole"  # without min_shards: one shard, as before
    ShardWriter(str(whole), classes, options=ShardsConfig(min_shards=None, workers=1, progress=False)).write(photos)
    assert len(read_manifest(str(whole)).shards) == 1 and "target_bytes" not in _sidecars(whole)[0]


def test_the_docs_state_the_shard_count_rule_the_writer_plans_by() -> None:
    """The data page's sentence (How many shards), with the defaults' numbers: 32 shards between 32 x 4 MiB and
    32 x 256 MiB, about one per 4 MiB below (3,000 JPEGs of 28 KB: 22, as the greedy plan cuts them), not "at least
    32"."""
    page = " ".join((ROOT / "infra" / "docs" / "pages" / "data.md").read_text().split())
    defaults = ShardsConfig()
    low, high = defaults.min_shards * defaults.min_shard_mb, defaults.min_shards * defaults.max_shard_mb / 1024
    assert f"a dataset of {low:.0f} MiB to {high:.0f} GiB makes {defaults.min_shards} shards" in page
    assert f"about one shard per {defaults.min_shard_mb:.0f} MiB" in page and "at least 32 shards" not in page
    records = [record_bytes(28_000, 40)] * 3000
    target, shards, size = planned_shard_bytes(sum(records), defaults), 1, 0
    for record in records:  # the writer's greedy cut (`ShardWriter._next_group`)
        if size and tar_bytes(size + record) > target:
            shards, size = shards + 1, 0
        size += record
    assert target == defaults.min_shard_bytes and "3,000 JPEGs of 28 KB make 22" in page and shards == 22


def test_overwrite_replaces_a_prefix_of_other_settings_manifest_last(photos: list, tmp_path: Path) -> None:
    classes = [ClassInfo(i, f"c{i}") for i in range(3)]
    items = photos[:12]

    def options(cap: int, **more: object) -> ShardsConfig:
        return ShardsConfig(max_shard_samples=cap, min_shards=None, workers=1, progress=False, **more)

    out, clean = tmp_path / "ds", tmp_path / "clean"
    ShardWriter(str(out), classes, options=options(3)).write(items)  # 4 shards
    with pytest.raises(ShardWriteError, match=r"shard-000000.json: .*other settings.*shards\.overwrite=true"):
        ShardWriter(str(out), classes, options=options(5)).write(items)

    def failing():
        for i, item in enumerate(items):
            if i == 6:
                raise ConnectionError("source went away")
            yield item

    with pytest.raises(ConnectionError):  # an interrupted overwrite: the old dataset is no longer visible
        ShardWriter(str(out), classes, options=options(5, overwrite=True)).write(failing())
    assert not (out / "manifest.json").exists() and (out / "shard-000003.tar").exists()
    with pytest.raises(ShardWriteError, match="other settings"):  # old shards remain: still refused without it
        ShardWriter(str(out), classes, options=options(5)).write(items)
    report = ShardWriter(str(out), classes, options=options(5, overwrite=True)).write(items)
    assert report.skipped_shards == [0] and report.written_shards == [1, 2]  # shard 0 kept from the interrupted run
    ShardWriter(str(clean), classes, options=options(5, overwrite=True)).write(items)
    assert _files(out) == _files(clean)  # stale shard-000003.* removed, same bytes as a fresh write
    assert [s.samples for s in read_manifest(str(out)).shards] == [5, 5, 2]


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_folder_and_demo_end_to_end(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = str(ROOT / "jobs" / "make_shards.py")
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, script, "--images", str(folder), "--labels", str(folder / "labels.csv"), "--out", str(out),
         "shards.max_shard_mb=0.0625", "shards.workers=1", "shards.max_image_side=256", "shards.progress=false"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert "35 samples" in run.stdout and "bad inputs skipped: 2" in run.stdout and "truncated.jpg" in run.stdout
    assert read_manifest(str(out)).extra["writer"]["max_image_side"] == 256

    demo = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, script, "--demo", "tiny", "--split", "eval", "--count", "5", "--seed", "3", "--out",
         str(demo), "--image-size", "96", "shards.workers=1", "shards.progress=false"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    manifest = read_manifest(str(demo))
    assert manifest.num_samples == 5 and manifest.labels == "dense" and manifest.extra["demo"]["seed"] == 3
    assert len(classes_from_tsv((demo / "classes.tsv").read_text())) == manifest.num_classes

    main = runpy.run_path(script)["main"]  # the error path in-process (a third interpreter start costs seconds)
    assert main(["--images", str(folder), "--labels", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x")]) == 2
    assert "none.csv" in capsys.readouterr().err
    assert main(["--demo", "tiny", "--count", "5", "--out", str(tmp_path / "y"), "shards.jpeg_quality=0"]) == 2
    assert "shards.jpeg_quality" in capsys.readouterr().err  # settings are the config's, checked before any work


def test_an_output_bucket_that_does_not_exist_is_refused_unless_asked_to_create_it(
        local_s3, capsys: pytest.CaptureFixture) -> None:
    """SeaweedFS creates a bucket on the first write into it: a typo in --out's bucket would make a new one."""
    main = runpy.run_path(str(ROOT / "jobs" / "make_shards.py"))["main"]
    bucket = f"tset-{uuid.uuid4().hex[:8]}"  # "test" mistyped
    out = f"s3://{bucket}/mine/train"
    args = ["--demo", "tiny", "--count", "3", "--image-size", "64", "--out", out, "shards.workers=1",
            "shards.progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: StorageError: {out}: bucket '{bucket}' does not exist at {local_s3.endpoint_url}; check the " \
           "URL for a typo, or add storage.create_bucket=true to create it\n" in err and "Traceback" not in err
    fs, _ = filesystem(out)
    with pytest.raises(FileNotFoundError):
        fs.call_s3("head_bucket", Bucket=bucket)  # nothing was created
    assert main([*args, "storage.create_bucket=true"]) == 0
    assert read_manifest(out).num_samples == 3
    require_bucket("/nonexistent/dir/x")  # local paths are not buckets: nothing to check
