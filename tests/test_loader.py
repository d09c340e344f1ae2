"""The streaming loader against real shards on the embedded S3 server: ranks run in-process (rank=r, world_size=W)."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
import simplejpeg
import torch
import webdataset as wds
from PIL import Image

import pipeline.data.loading.stream as stream_module
import pipeline.data.loading.workers as workers_module
from pipeline.config import DataConfig, ShardsConfig
from pipeline.data.format import ClassInfo, Manifest, ShardInfo, read_manifest, write_manifest
from pipeline.data.loading import BadDataError, Batch, ShardSplitError, ShardStream, check_shard_split, to_device
from pipeline.data.loading.batch import SharedBuffers
from pipeline.data.loading.decode import _fast_scale, decode_image
from pipeline.data.loading.plan import Split, resumed_plan, train_plan
from pipeline.data.writing import Sample, ShardWriter
from pipeline.storage import StorageError, join_url, write_bytes

NUM_CLASSES = 10
UNEVEN = [7, 3, 11, 5, 9]


def jpeg(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A small textured JPEG (smooth gradients plus noise, so crops and DCT scaling matter)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (1 + seed % 3)) % 256, (yy * 2) % 256, (xx + yy + seed * 17) % 256], axis=-1)
    image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def labels_of(n: int) -> list[int]:
    return sorted({n % NUM_CLASSES, (3 * n + 1) % NUM_CLASSES})


def tar_bytes(members: list[dict]) -> bytes:
    out = io.BytesIO()
    with wds.TarWriter(out) as writer:
        for sample in members:
            writer.write(sample)
    return out.getvalue()


def good_sample(n: int) -> dict:
    return {"__key__": f"s{n:05d}", "jpg": jpeg(n), "json": json.dumps({"labels": labels_of(n)}).encode()}


def publish(prefix: str, shards: list[tuple[bytes, int]]) -> None:
    """Upload tars (bytes, sample count the manifest claims) and the manifest."""
    infos = []
    for j, (data, count) in enumerate(shards):
        name = f"shard-{j:06d}.tar"
        write_bytes(join_url(prefix, name), data)
        infos.append(ShardInfo(name, count, len(data)))
    write_manifest(prefix, Manifest(num_classes=NUM_CLASSES, shards=infos))


@pytest.fixture(scope="module")
def uneven(local_s3) -> str:
    """Shards of 7, 3, 11, 5, 9 samples (keys s00000..s00034) on S3."""
    prefix = f"s3://test/uneven-{os.getpid()}-{random.getrandbits(32):08x}"
    shards, n = [], 0
    for count in UNEVEN:
        shards.append((tar_bytes([good_sample(n + i) for i in range(count)]), count))
        n += count
    publish(prefix, shards)
    return prefix


def config(**overrides) -> DataConfig:
    base = {"image_size": 71, "loader_workers": 2, "shuffle_buffer": 8, "bad_data_window": 1000}
    return DataConfig(**{**base, **overrides})


def streams(prefix: str, world: int, batch: int = 2, train: bool = True, **overrides) -> list[ShardStream]:
    data = config(**overrides)
    manifest = read_manifest(prefix)
    return [ShardStream(prefix, data, batch_size=batch, rank=r, world_size=world, train=train, manifest=manifest)
            for r in range(world)]


def take(iterator, n: int) -> list[Batch]:
    return [next(iterator) for _ in range(n)]


def keys(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]


# ------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("decoder", ["pil_draft", "simplejpeg"])
def test_writer_to_s3_to_loader_round_trip(s3_prefix: str, decoder: str) -> None:
    sources = {f"img{n:03d}": (jpeg(n, (80, 80)), labels_of(n)) for n in range(10)}
    writer = ShardWriter(s3_prefix, [ClassInfo(i, f"class{i}") for i in range(NUM_CLASSES)],
                         options=ShardsConfig(samples_per_shard=4, workers=1, progress=False))
    writer.write([Sample(key=k, labels=lab, image=data) for k, (data, lab) in sources.items()])
    data = config(image_size=80, loader_workers=0, decoder=decoder, augment={"eval_crop_fraction": 1.0})
    stream = ShardStream(s3_prefix, data, batch_size=4, rank=0, world_size=1, train=False)
    seen = {}
    for batch in stream:
        assert batch.images.is_contiguous(memory_format=torch.channels_last)  # HWC as decoded, no host transpose
        for i, key in enumerate(batch.keys):
            if batch.valid[i]:
                seen[key] = (batch.images[i].permute(1, 2, 0).numpy(), batch.labels(i))
    assert sorted(seen) == sorted(sources)
    for key, (image, labels) in seen.items():
        source, source_labels = sources[key]
        expected = (np.asarray(Image.open(io.BytesIO(source)).convert("RGB")) if decoder == "pil_draft"
                    else simplejpeg.decode_jpeg(source, colorspace="RGB"))
        np.testing.assert_array_equal(image, expected, err_msg=key)
        assert labels == source_labels


# ------------------------------------------------------------------------------------------------ exact epochs


def run_epochs(prefix: str, epochs: int, **overrides) -> list[list[list[Batch]]]:
    """batches[rank][epoch] for 2 ranks x 2 loader workers, batch 2."""
    out = []
    for stream in streams(prefix, 2, **overrides):
        per_epoch = stream.batches_per_epoch()
        iterator = iter(stream)
        out.append([take(iterator, per_epoch) for _ in range(epochs)])
        assert stream.metrics()["dropped_epoch_end"] == epochs * (sum(UNEVEN) - per_epoch * 2 * 2)
    return out


def test_exact_epochs_over_uneven_shards(uneven: str) -> None:
    runs = run_epochs(uneven, 2)
    per_epoch = len(runs[0][0])
    assert per_epoch == len(runs[1][0]) > 0
    # Arithmetic of the plan: ranks get 11+5+3=19 and 9+7=16 samples; workers 11|8 and 9|7 -> 5+4, 4+3 batches.
    assert per_epoch == 7
    dropped = sum(UNEVEN) - per_epoch * 2 * 2
    for epoch in range(2):
        batches = [b for rank in runs for b in rank[epoch]]
        assert all(b.epoch == epoch and len(b) == 2 and bool(b.valid.all()) for b in batches)
        seen = keys(batches)
        assert len(seen) == len(set(seen)) == sum(UNEVEN) - dropped
        assert {b.slot for b in runs[0][epoch]} == {0, 1} and {b.slot for b in runs[1][epoch]} == {2, 3}
    assert keys(runs[0][0]) != keys(runs[0][1])  # epoch 2 is a new order
    again = run_epochs(uneven, 1)
    assert [keys(r[0]) for r in again] == [keys(r[0]) for r in runs]
    assert all(torch.equal(a.images, b.images) for a, b in zip(again[0][0], runs[0][0], strict=True))
    other = run_epochs(uneven, 1, seed=1)
    assert [keys(r[0]) for r in other] != [keys(r[0]) for r in runs]


# ----------------------------------------------------------------------------------------------------- resume


def test_resume_same_world_size_continues_exactly(uneven: str) -> None:
    reference = [take(iter(s), 2 * s.batches_per_epoch()) for s in streams(uneven, 2)]
    first = streams(uneven, 2)
    iterators = [iter(s) for s in first]
    for it in iterators:
        take(it, 3)
    state = {"ranks": json.loads(json.dumps([s.state_dict() for s in first]))}  # as a checkpoint stores it
    for it in iterators:
        take(it, 1)  # in flight: delivered after the checkpoint
    for rank, stream in enumerate(streams(uneven, 2)):
        stream.load_state_dict(state)
        resumed = take(iter(stream), len(reference[rank]) - 3)
        assert [(b.epoch, b.keys) for b in resumed] == [(b.epoch, b.keys) for b in reference[rank][3:]]
        assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, reference[rank][3:], strict=True))


@pytest.mark.parametrize(("old", "new"), [((2, 2), (1, 2)), ((1, 1), (3, 1))])
def test_resume_with_another_world_size_resplits_the_rest(uneven: str, old: tuple, new: tuple) -> None:
    (old_world, old_workers), (new_world, new_workers) = old, new
    first = streams(uneven, old_world, loader_workers=old_workers)
    iterators = [iter(s) for s in first]
    before = [k for it in iterators for k in keys(take(it, 3))]
    state = {"ranks": [s.state_dict() for s in first]}
    in_flight = [k for it in iterators for k in keys(take(it, 1))]
    resumed = streams(uneven, new_world, loader_workers=new_workers)
    after, counts = [], []
    for stream in resumed:
        stream.load_state_dict(state)
        rest = stream.plan()
        assert rest.segment == 1 and rest.split.world_size == new_world
        batches = take(iter(stream), rest.batches_per_rank)
        assert all(b.epoch == 0 for b in batches)
        counts.append(len(batches))
        after += keys(batches)
    assert len(set(counts)) == 1 and counts[0] > 0
    assert len(after) == len(set(after))  # no sample twice in the rest of the epoch
    assert not set(after) & set(before)  # nothing consumed before the checkpoint comes back
    assert set(after) | set(before) | set(in_flight) <= {f"s{n:05d}" for n in range(sum(UNEVEN))}
    # Every sample of the epoch is seen or reported dropped by the re-split plan.
    assert len(set(before) | set(after)) == sum(UNEVEN) - rest.dropped
    assert resumed[0].metrics()["dropped_epoch_end"] == rest.dropped
    # Later epochs use the new split.
    later = next(iter(resumed[0]))
    assert later.epoch == 1 and resumed[0].plan().segment == 0


def test_each_epoch_is_planned_once_per_process(uneven: str, monkeypatch) -> None:
    """The main process plans each epoch segment once and hands the plan to its workers, which plan only the epochs
    after it (here the worker runs in-process, so both sides' calls are seen)."""
    calls = []

    def counting(side: str, real):
        def plan(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append((side, result.epoch))
            return result
        return plan

    monkeypatch.setattr(stream_module, "resumed_plan", counting("stream", stream_module.resumed_plan))
    monkeypatch.setattr(workers_module, "train_plan", counting("worker", workers_module.train_plan))
    stream = ShardStream(uneven, config(loader_workers=0), batch_size=2, rank=0, world_size=2, train=True)
    per_epoch = stream.batches_per_epoch()
    batches = take(iter(stream), 2 * per_epoch + 1)
    stream.state_dict()
    assert batches[-1].epoch == 2 and stream.plan().epoch == 2
    assert calls == [("stream", 0), ("worker", 1), ("stream", 1), ("worker", 2), ("stream", 2)]


def test_state_refuses_a_partial_resplit(uneven: str) -> None:
    first = streams(uneven, 2)
    take(iter(first[0]), 1)
    stream = streams(uneven, 1)[0]
    with pytest.raises(ValueError, match=r"ranks \[1\] are missing"):
        stream.load_state_dict({"ranks": [first[0].state_dict()]})


# --------------------------------------------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def broken(local_s3) -> tuple[str, dict]:
    """Shards with every kind of damage; returns the prefix and the expected good keys and skip counts."""
    prefix = f"s3://test/broken-{os.getpid()}-{random.getrandbits(32):08x}"
    good = [good_sample(n) for n in range(6)]
    damaged = [good_sample(n) for n in range(10, 16)]
    damaged[0]["jpg"] = b"\xff\xd8 not really a jpeg"
    damaged[1]["json"] = json.dumps({"tags": [1]}).encode()  # no "labels"
    damaged[2]["json"] = json.dumps({"labels": [NUM_CLASSES + 5]}).encode()  # out of range
    damaged[3]["json"] = json.dumps({"labels": [1.5]}).encode()  # not an integer
    damaged[4]["json"] = b"{not json"
    whole = tar_bytes([good_sample(n) for n in range(20, 26)])
    truncated = whole[: len(whole) // 2]  # dies midway: some samples survive
    garbage = b"this is not a tar archive" * 100
    publish(prefix, [(tar_bytes(good), 6), (tar_bytes(damaged), 6), (truncated, 6), (garbage, 4)])
    return prefix, {"damaged_good": {"s00015"}, "skips": {"bad_image": 1, "bad_label": 4, "corrupt_shard": 4}}


def test_bad_samples_are_skipped_and_counted(broken: tuple[str, dict]) -> None:
    prefix, expected = broken
    stream = streams(prefix, 1, batch=4, train=False, loader_workers=1, max_bad_fraction=0.9)[0]
    batches = list(stream)
    seen = keys(batches)
    metrics = stream.metrics()
    assert len(seen) == len(set(seen))
    survivors = {k for k in seen if k.startswith("s0002")}
    assert 0 < len(survivors) < 6  # the truncated shard delivered its first samples
    assert set(seen) == {f"s{n:05d}" for n in range(6)} | expected["damaged_good"] | survivors
    for reason, n in expected["skips"].items():
        assert metrics[f"skipped_{reason}"] == n, reason
    assert metrics["skipped_truncated_shard"] == 6 - len(survivors)
    assert metrics["skipped"] == 22 - len(seen)
    assert len(batches) == stream.batches_per_epoch()  # skipped samples became padding, batch count unchanged
    assert all(not k for b in batches for k, v in zip(b.keys, b.valid.tolist(), strict=True) if not v)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_short_slots_refill_to_keep_batch_counts(broken: tuple[str, dict]) -> None:
    prefix, _ = broken
    stream = streams(prefix, 1, batch=4, loader_workers=0, max_bad_fraction=0.9)[0]
    per_epoch = stream.batches_per_epoch()
    batches = take(iter(stream), per_epoch)
    assert per_epoch == 22 // 4 and all(b.epoch == 0 and bool(b.valid.all()) for b in batches)
    metrics = stream.metrics()
    assert metrics["refilled"] == 4 * per_epoch - (22 - metrics["skipped"])
    assert metrics["refilled"] > 0 and metrics["padded"] == 0
    # One slot per shard: the garbage shard's slot has no good sample at all and pads (valid=False) instead.
    stream = streams(prefix, 1, batch=1, loader_workers=4, max_bad_fraction=0.9)[0]
    batches = take(iter(stream), stream.batches_per_epoch())
    metrics = stream.metrics()
    assert len(batches) == 22 and metrics["padded"] == 4 == sum(not b.valid.all() for b in batches)
    assert metrics["refilled"] == 22 - 4 - (22 - metrics["skipped"])


def test_too_many_bad_samples_fail_naming_the_shard(broken: tuple[str, dict]) -> None:
    prefix, _ = broken
    stream = streams(prefix, 1, batch=2, train=False, loader_workers=0, max_bad_fraction=0.1,
                     bad_data_window=8)[0]
    with pytest.raises(BadDataError, match=r"max_bad_fraction=0.1.*shard-00000[123]\.tar"):
        list(stream)


def test_missing_shard_names_the_url(s3_prefix: str) -> None:
    write_manifest(s3_prefix, Manifest(num_classes=NUM_CLASSES, shards=[ShardInfo("nowhere.tar", 3)]))
    stream = ShardStream(s3_prefix, config(loader_workers=0), batch_size=2, rank=0, world_size=1, train=False)
    with pytest.raises(StorageError, match=r"nowhere\.tar"):
        list(stream)


def planned(plan, counts: list[int], slot: int) -> list[tuple[int, int]]:
    return [(plan.slots[slot].parts[pi].shard, k) for _, pi, k in plan.planned_items(slot)]


def expand(consumed: dict, counts: list[int]) -> set[tuple[int, int]]:
    return {(s, int(k)) for s, ks in consumed.items() for k in (range(counts[s]) if ks is None else ks)}


def test_plan_positions_name_the_consumed_samples() -> None:
    counts = [7, 3, 11, 5, 9, 0, 4]
    plan = train_plan(counts, Split(2, 2, 2, shuffle_buffer=6, shuffle_shards=True), seed=3, epoch=1)
    everything = [item for slot in range(4) for item in planned(plan, counts, slot)]
    assert sorted(everything) == [(s, k) for s, c in enumerate(counts) for k in range(c)]
    for slot in range(4):
        items = planned(plan, counts, slot)
        for position in range(len(items) + 1):  # computable from the manifest alone: the basis of resume
            assert expand(plan.consumed(slot, position), counts) == set(items[:position])
    # Two re-splits in a row: what is left is exactly what no earlier segment consumed.
    first = {0: 5, 1: 2, 2: 6, 3: 0}
    second_split = Split(3, 1, 2, shuffle_buffer=4, shuffle_shards=True)
    second = resumed_plan(counts, [(plan.split, first)], second_split, seed=3, epoch=1)
    taken = set().union(*(expand(plan.consumed(s, p), counts) for s, p in first.items()))
    left = [item for slot in range(3) for item in planned(second, counts, slot)]
    assert len(left) == len(set(left)) and set(left) == set(everything) - taken
    third = resumed_plan(counts, [(plan.split, first), (second_split, {0: 3, 1: 1, 2: 2})],
                         Split(1, 2, 2, shuffle_buffer=4, shuffle_shards=True), seed=3, epoch=1)
    taken |= set().union(*(expand(second.consumed(s, p), counts) for s, p in {0: 3, 1: 1, 2: 2}.items()))
    final = [item for slot in range(2) for item in planned(third, counts, slot)]
    assert len(final) == len(set(final)) and set(final) == set(everything) - taken
    assert third.dropped == len(final) - third.batches_per_rank * 2


# ------------------------------------------------------------------------------------------------------- eval


def test_eval_every_sample_once_with_padding(uneven: str) -> None:
    runs = [list(s) for s in streams(uneven, 2, batch=4, train=False)]
    assert len(runs[0]) == len(runs[1]) > 0
    seen = keys(runs[0] + runs[1])
    assert sorted(seen) == [f"s{n:05d}" for n in range(sum(UNEVEN))]
    padded = [(b, i) for b in runs[0] + runs[1] for i in range(len(b)) if not b.valid[i]]
    assert len(padded) == 2 * len(runs[0]) * 4 - sum(UNEVEN)
    assert all(b.keys[i] == "" and b.labels(i) == [] and int(b.images[i].max()) == 0 for b, i in padded)
    # Dataset-wide sample ids (manifest order) identify eval images across ranks; padding is -1.
    ids = {b.keys[i]: int(b.sample_ids[i]) for b in runs[0] + runs[1] for i in range(len(b)) if b.valid[i]}
    assert ids == {key: int(key[1:]) for key in seen}
    assert all(int(b.sample_ids[i]) == -1 for b, i in padded)
    again = [list(s) for s in streams(uneven, 2, batch=4, train=False)]
    assert [[b.keys for b in r] for r in again] == [[b.keys for b in r] for r in runs]  # deterministic order
    many = [list(s) for s in streams(uneven, 7, batch=4, train=False, loader_workers=0)]  # ranks > shards
    assert len({len(r) for r in many}) == 1 and sorted(keys([b for r in many for b in r])) == sorted(seen)


# ------------------------------------------------------------------------------------------------------ split


def test_check_shard_split_refuses_too_few_shards(uneven: str) -> None:
    manifest = read_manifest(uneven)
    check_shard_split(manifest, world_size=2, loader_workers=2)
    with pytest.raises(ShardSplitError, match=r"5 non-empty shards.*2 ranks x 3 loader workers.*loader_workers=2"):
        check_shard_split(manifest, world_size=2, loader_workers=3)
    with pytest.raises(ShardSplitError, match="6 ranks"):
        check_shard_split(manifest, world_size=6, loader_workers=1)
    with pytest.raises(ShardSplitError, match="no full batch"):
        check_shard_split(manifest, world_size=2, loader_workers=2, batch_size=12)
    with pytest.raises(ShardSplitError):
        ShardStream(uneven, config(loader_workers=3), batch_size=2, rank=0, world_size=2, train=True)


# ---------------------------------------------------------------------------------------------------- devices


def test_to_device_multi_hot_and_pixels() -> None:
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)  # as loaded
    images[0] = 255
    images[1, :, 0, 0] = 51
    batch = Batch(images=images, label_ids=torch.tensor([1, 3, 0]), label_offsets=torch.tensor([0, 2, 2, 3]),
                  keys=["a", "b", ""], valid=torch.tensor([True, True, False]), sample_ids=torch.tensor([4, 9, -1]),
                  epoch=0, segment=0, slot=0, index=0,
                  position=3)
    x, y = to_device(batch, "cpu", num_classes=5)
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 4, 4) and x.is_contiguous()
    assert torch.equal(x, images)
    assert y.tolist() == [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    x_last, _ = to_device(batch, "cpu", num_classes=5, channels_last=True)
    assert x_last.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="num_classes=3"):
        to_device(batch, "cpu", num_classes=3)


def test_workers_reuse_their_shared_buffers_without_corrupting_batches(uneven: str, monkeypatch) -> None:
    owned: list[tuple[int, int]] = []
    real_own = stream_module.own_batch

    def own(batch: Batch, returned: list) -> Batch:
        owned.append(batch.buffer)
        return real_own(batch, returned)

    monkeypatch.setattr(stream_module, "own_batch", own)

    def images_by_key(workers: int) -> tuple[dict[str, torch.Tensor], int]:
        batches = list(streams(uneven, 1, batch=1, train=False, loader_workers=workers)[0])  # all held at once
        assert all(b.buffer is None and not b.images.is_shared() for b in batches)
        return {k: b.images[i] for b in batches for i, k in enumerate(b.keys) if b.valid[i]}, len(batches)

    alone, _ = images_by_key(0)
    shared, count = images_by_key(2)
    assert alone.keys() == shared.keys() and all(torch.equal(alone[k], shared[k]) for k in alone)
    assert len(owned) == count  # every batch came in a pooled buffer: handed back, the pool never ran dry
    assert len(set(owned)) <= 2 * SharedBuffers.LIMIT < count  # so buffers were reused
    # training: one iterator spans epochs (and a builder per epoch); buffers must come back epoch after epoch
    owned.clear()
    stream = streams(uneven, 1, batch=1, loader_workers=2)[0]
    batches = take(iter(stream), 12 * stream.batches_per_epoch())
    assert batches[-1].epoch == 11 and len(owned) == len(batches)


def test_decoders_crop_and_scale_large_images() -> None:
    data = jpeg(7, (640, 480))
    augment = config().augment
    for decoder in ("pil_draft", "simplejpeg"):
        out = decode_image(data, 96, augment, train=True, rng=random.Random(0), decoder=decoder)
        assert out.shape == (3, 96, 96) and out.dtype == torch.uint8
        center = decode_image(data, 96, augment, train=False, rng=random.Random(0), decoder=decoder)
        center = center.permute(1, 2, 0).numpy()
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((110, 30, 530, 450))
                               .resize((96, 96), Image.Resampling.BILINEAR), dtype=np.float32)
        assert np.abs(center.astype(np.float32) - reference).mean() < 6  # DCT scaling ~ full decode + resize


def test_decoders_scale_only_by_simd_factors() -> None:
    # libjpeg-turbo's 7/8, 3/4, ... scales are slower than full size: only 1/2, 1/4, 1/8 (or none) are chosen
    assert _fast_scale((500, 375), (342, 342)) == (0, 0)  # the eval crop of a 500x375 image needs ~7/8
    assert _fast_scale((1024, 768), (342, 342)) == (512, 384)
    assert _fast_scale((1024, 768), (300, 190)) == (512, 384)  # 1/4 gives 256 < 300
    assert _fast_scale((1000, 750), (125, 94)) == (125, 94)  # 1/8, rounded up as libjpeg does
    assert _fast_scale((1001, 751), (125, 94)) == (126, 94)


@pytest.mark.parametrize("size", [(120, 90), (90, 120), (160, 160)])
def test_decoded_images_are_channels_last_whatever_the_crop(size) -> None:
    # eval_crop_fraction=1 on a portrait or square image: a full-width crop, already compact in memory
    augment = config(augment={"eval_crop_fraction": 1.0}).augment
    data = jpeg(1, size)
    for train in (True, False):
        for seed in range(20):
            image = decode_image(data, 64, augment, train=train, rng=random.Random(seed))
            assert image.shape == (3, 64, 64) and image.stride() == (1, 3 * 64, 3), (train, seed)


def test_flip_is_a_mirror_of_the_same_crop_written_into_the_given_slot() -> None:
    data = jpeg(4, (400, 300))
    plain = config(augment={"horizontal_flip": False}).augment
    flipping = config().augment
    batch = torch.zeros(16, 96, 96, 3, dtype=torch.uint8).permute(0, 3, 1, 2)  # a channels-last batch
    mirrored = 0
    for seed in range(16):
        reference = decode_image(data, 96, plain, train=True, rng=random.Random(seed))
        out = decode_image(data, 96, flipping, train=True, rng=random.Random(seed), out=batch[seed])
        assert out.data_ptr() == batch[seed].data_ptr() and torch.equal(batch[seed], out)
        if torch.equal(out, reference.flip(-1)):
            mirrored += 1
        else:
            assert torch.equal(out, reference), seed  # the same crop either way: the flip draw comes after it
    assert 0 < mirrored < 16
    wide = (torch.zeros(3, 96, 200, dtype=torch.uint8), torch.zeros(96, 200, 3, dtype=torch.uint8).permute(2, 0, 1))
    for canvas in wide:
        view = canvas[:, :, 50:146]  # not compact: written through a copy
        decode_image(data, 96, flipping, train=True, rng=random.Random(3), out=view)
        assert torch.equal(view, decode_image(data, 96, flipping, train=True, rng=random.Random(3)))
    with pytest.raises(ValueError, match="out must be uint8 of shape"):
        decode_image(data, 64, plain, train=True, rng=random.Random(0), out=batch[0])


def test_fast_train_decode_is_close_to_accurate_and_eval_is_exact() -> None:
    data = jpeg(3, (320, 240))  # decoded at full size for a 160 crop (scaled decodes have no fast IDCT)
    augment = config().augment
    fast = decode_image(data, 160, augment, train=True, rng=random.Random(5), decoder="simplejpeg")
    exact = decode_image(data, 160, augment, train=True, rng=random.Random(5), decoder="simplejpeg",
                         fast_train_decode=False)
    difference = (fast.float() - exact.float()).abs()
    assert 0 < difference.mean() < 2  # the fast IDCT and upsampling differ by a level or two, no more
    evals = [decode_image(data, 160, augment, train=False, rng=random.Random(0), decoder="simplejpeg",
                          fast_train_decode=flag) for flag in (True, False)]
    assert torch.equal(*evals)


# ------------------------------------------------------------------------------------------------------ cache


def test_cache_serves_later_passes_and_respects_its_size(uneven: str, tmp_path) -> None:
    cache = tmp_path / "cache"
    stream = streams(uneven, 1, batch=4, train=False, loader_workers=0, cache_dir=str(cache))[0]
    first = keys(list(stream))
    assert stream.metrics()["cache_misses"] == 5 and stream.metrics()["cache_hits"] == 0
    assert keys(list(stream)) == first
    assert stream.metrics()["cache_hits"] == 5 and stream.metrics()["cache_misses"] == 5
    sizes = sorted(os.path.getsize(p) for p in cache.iterdir() if not p.name.startswith("."))
    assert len(sizes) == 5
    limit = sizes[-1] + sizes[-2]
    small = tmp_path / "small"
    stream = streams(uneven, 1, batch=4, train=False, loader_workers=0, cache_dir=str(small),
                     cache_max_gb=limit / 2**30)[0]
    list(stream)
    kept = [p for p in small.iterdir() if not p.name.startswith(".")]
    assert 0 < len(kept) < 5 and sum(p.stat().st_size for p in kept) <= limit
    list(stream)
    assert stream.metrics()["cache_misses"] > 5  # evicted shards were fetched again
    shared = str(tmp_path / "shared")  # two ranks x two worker processes share one cache directory
    for expect_hits in (0, 5):
        ranks = streams(uneven, 2, batch=4, train=False, loader_workers=2, cache_dir=shared)
        for r in ranks:
            list(r)
        assert sum(r.metrics()["cache_hits"] for r in ranks) == expect_hits
        assert sum(r.metrics()["cache_misses"] for r in ranks) == 5 - expect_hits
