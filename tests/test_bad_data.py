"""Bad data on real shards: the bad-data limit judged over a fair window, and where a broken shard broke."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.adopt.scan import scan_shard
from pipeline.data.format import OWN_FORMAT, Manifest, ShardInfo, write_manifest
from pipeline.data.loading import BadDataError, ShardStream
from pipeline.inference.inputs import plan_parts, read_part

NUM_CLASSES = 4
SHARD_SAMPLES = 1000


def _jpeg() -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _tar(keys: list[str], bad: set[str]) -> bytes:
    image, out = _jpeg(), io.BytesIO()
    with wds.TarWriter(out) as writer:
        for key in keys:
            writer.write({"__key__": key, "jpg": b"not a jpeg" if key in bad else image,
                          "json": json.dumps({"labels": [len(key) % NUM_CLASSES]}).encode()})
    return out.getvalue()


def dataset(root: Path, bad_per_shard: list[int], tars: dict[int, bytes] | None = None) -> str:
    """Shards of 1,000 samples with `bad_per_shard[j]` undecodable images each, spread over the shard (bad samples
    cluster by shard, not within one); `tars` replaces shard j's bytes (the manifest still claims 1,000)."""
    root.mkdir()
    infos = []
    for j, n_bad in enumerate(bad_per_shard):
        keys = [f"s{j:02d}{i:04d}" for i in range(SHARD_SAMPLES)]
        data = (tars or {}).get(j) or _tar(keys, set(keys[:: SHARD_SAMPLES // n_bad][:n_bad]) if n_bad else set())
        (root / f"shard-{j:06d}.tar").write_bytes(data)
        infos.append(ShardInfo(f"shard-{j:06d}.tar", SHARD_SAMPLES, len(data)))
    write_manifest(str(root), Manifest(num_classes=NUM_CLASSES, shards=infos))
    return str(root)


def one_epoch(prefix: str, **data: object) -> ShardStream:
    """Read one training epoch in manifest order (one rank, in-process) and return the stream."""
    config = DataConfig(**{"image_size": 71, "loader_workers": 0, "shuffle_buffer": 0, "shuffle_shards": False,
                           "max_bad_fraction": 0.1, **data})
    stream = ShardStream(prefix, config, batch_size=100, rank=0, world_size=1, train=True)
    batches = iter(stream)
    for _ in range(stream.batches_per_epoch()):
        next(batches)
    return stream


# The dataset: 4.7% bad overall, but its front (two shards) 14% bad.
FRONT_HEAVY = [140, 140] + [38] * 18 + [23]


@pytest.mark.slow  # 21,000 samples decoded: ~10 s alone, 20 s on 2 busy cores
def test_a_dataset_bad_at_its_front_is_judged_over_the_window_not_its_first_shard(tmp_path: Path) -> None:
    prefix = dataset(tmp_path / "front-heavy", FRONT_HEAVY)
    assert sum(FRONT_HEAVY) / (SHARD_SAMPLES * len(FRONT_HEAVY)) == pytest.approx(0.047, abs=5e-4)

    stream = one_epoch(prefix)  # the default window (10,000 samples): the whole epoch passes
    assert stream.metrics()["bad_fraction"] == pytest.approx(0.047, abs=5e-4)
    assert stream.metrics()["skipped"] == sum(FRONT_HEAVY)  # every shard was read, every bad sample counted

    with pytest.raises(BadDataError) as info:  # judged on ~1,000 samples, as before, it is stopped
        one_epoch(prefix, bad_data_window=1000)
    message = str(info.value)
    assert re.search(r"^(1[01]\d) of (\d{3}) samples read by rank 0 were bad \(14\.\d% > data.max_bad_fraction=0.1\), "
                     r"judged on those \2 samples from 1 shard\(s\), before a full window \(data.bad_data_window="
                     r"1000\): more than 0.1 x 1000 are bad already, so no full window could pass\. Skipped: "
                     r"bad_image=\1\. Worst shards: \S+shard-000000.tar \(\1\)\. Latest: \S+shard-000000.tar key "
                     r"s00\d{4} \(bad_image: UnidentifiedImageError: cannot identify image file "
                     r"\(10 bytes\)\)$", message), message


@pytest.mark.slow  # ~5,000 samples decoded
def test_hopeless_data_stops_before_the_window_saying_why(tmp_path: Path) -> None:
    prefix = dataset(tmp_path / "bad", [300] * 12)  # 30% bad everywhere
    with pytest.raises(BadDataError) as info:
        one_epoch(prefix)
    message = str(info.value)
    found = re.search(r"^(\d+) of (\d+) samples read by rank 0 were bad \((\d+\.\d)% > data.max_bad_fraction=0.1\), "
                      r"judged on those \2 samples from (\d+) shard\(s\), before a full window "
                      r"\(data.bad_data_window=10000\): more than 0.1 x 10000 are bad already, so no full window "
                      r"could pass\. Skipped: bad_image=\1\. Worst shards: .*shard-0000\d\d\.tar \(300\)", message)
    assert found, message
    bad, seen, percent, shards = int(found[1]), int(found[2]), float(found[3]), int(found[4])
    assert 1000 < bad <= 1100 and seen < 10_000 and 29 < percent < 31  # stopped at the first certain verdict
    assert shards == -(-seen // SHARD_SAMPLES)
    assert "Latest: " + str(Path(prefix) / "shard-") in message and "(bad_image: " in message

    small = dataset(tmp_path / "small", [300, 300])  # smaller than the window: judged at the epoch's end
    with pytest.raises(BadDataError, match=r"^600 of 2000 samples .* judged on those 2000 samples from 2 shard\(s\), "
                       r"the end of epoch 0, short of a full window \(data.bad_data_window=10000\)\."):
        one_epoch(small)


def broken_dataset(root: Path) -> tuple[str, int]:
    """Three shards, the manifest claiming 1,000 samples each: whole, cut inside sample 186, and not a tar at all;
    and the byte the cut one ends at."""
    keys = [f"t{i:04d}" for i in range(SHARD_SAMPLES)]
    whole = _tar(keys, set())
    member = len(whole) // SHARD_SAMPLES // 2  # bytes per tar member (image or labels)
    cut_in_member = whole[: 372 * member + 700]  # inside sample 186
    garbage = b"this is not a tar archive" * 100
    return dataset(root, [0, 0, 0], tars={1: cut_in_member, 2: garbage}), len(cut_in_member)


def test_a_truncated_shard_is_logged_with_its_url_and_where_it_broke(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix, cut_at = broken_dataset(tmp_path / "broken")
    with caplog.at_level(logging.WARNING):
        stream = one_epoch(prefix, max_bad_fraction=0.9)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    truncated, corrupt = str(Path(prefix) / "shard-000001.tar"), str(Path(prefix) / "shard-000002.tar")
    shard_lines = [line for line in lines if line.startswith("shard ")]
    assert len(shard_lines) == 2, lines  # once per shard, not once per lost sample
    # tarfile ends the stream at the cut without an error: sample 186 arrives incomplete, then the tar ends
    assert re.fullmatch(rf"shard {re.escape(truncated)}: ended after sample 186 \(key t0186\), at byte "
                        rf"{cut_at}; 187 of 1000 samples delivered \(the other 813 are skipped\)",
                        shard_lines[0]), shard_lines[0]
    assert re.fullmatch(rf"shard {re.escape(corrupt)}: unreadable before its first sample, at byte \d+: "
                        r"ReadError: .*; 0 of 1000 samples delivered \(the other 1000 are skipped\)", shard_lines[1])
    assert not [line for line in lines if " object at 0x" in line or " @ " in line or "#" in line]
    metrics = stream.metrics()
    assert metrics["skipped_truncated_shard"] == 813 and metrics["skipped_corrupt_shard"] == 1000
    assert metrics["skipped"] == 813 + 1000 + 1  # and sample 186, which arrived incomplete


def test_the_loader_prediction_and_the_indexer_read_a_broken_shard_alike(tmp_path: Path) -> None:
    """One routine reads shards for all three (`pipeline.data.format.ShardSamples`): the same samples delivered
    before the break, and a break where the loader finds one (its own words: test above)."""
    prefix, _ = broken_dataset(tmp_path / "broken")
    delivered, ends = {0: 1000, 1: 187, 2: 0}, []
    for part in plan_parts(prefix, "shards", rows_per_part=100):
        rows = [row for chunk in read_part(part) for row in chunk]
        images = [row for row in rows if row["key"] not in (None, part["shard"])]
        ends += [row["error"] for row in rows if row["key"] == part["shard"]]
        scan = scan_shard(part["shard"], OWN_FORMAT)
        assert len(images) == scan.samples == delivered[part["part"]], part
    assert ends == ["corrupt shard: it ended after 187 of 1000 samples",
                    "corrupt shard after 0 samples: ReadError: invalid header"]
    assert scan.error == "ReadError: invalid header"


def _train_rank(rank: int, world: int, port: int, prefix: str, out: str) -> None:
    """One rank of a 2-process gloo DDP run of the real training loop; writes its final record, its own loader's
    counters at that record, and (rank 0) its log, to `out`.rankN.json."""
    import os

    import torch
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.data.loading import stream
    from pipeline.train.loop import train
    from pipeline.train.ranks import WorkerContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    own: dict[str, float] = {}
    metrics = stream.ShardStream.metrics

    def recorded(self: stream.ShardStream) -> dict[str, float]:
        own.update(metrics(self))
        return metrics(self)

    stream.ShardStream.metrics = recorded  # type: ignore[method-assign]
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("pipeline.train.scalars").addHandler(handler)
    logging.getLogger("pipeline.train.scalars").setLevel(logging.INFO)
    config = load_config("demo", [
        "model.width_multiplier=0.125", "model.middle_blocks=1", f"model.num_classes={NUM_CLASSES}",
        f"data.train={prefix}", "data.eval=null", "data.image_size=71", "data.loader_workers=0",
        "data.max_bad_fraction=0.5", f"cluster.num_workers={world}", "train.global_batch_size=8",
        "train.total_steps=6", "train.log_every=3", f"run.storage={out}.runs", "checkpoint.background=false"])
    final = train(config, WorkerContext(rank=rank, world_size=world))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"final": final, "own": own, "lines": lines}))
    dist.destroy_process_group()


@pytest.mark.slow  # two training processes: ~20 s
def test_bad_data_counts_in_the_log_and_records_are_the_whole_jobs(tmp_path: Path) -> None:
    """Two DDP ranks (gloo, real processes) train on shards with bad images: the logged line and the record (which
    checkpoints commit and trackers receive) count every rank's skipped samples, not rank 0's alone."""
    import os

    import torch.multiprocessing as mp

    from pipeline.data.format import ClassInfo, write_classes

    root = tmp_path / "bad"
    root.mkdir()
    infos = []
    for j, n_bad in enumerate([3, 6, 2, 9]):  # every shard 48 samples, some undecodable
        keys = [f"b{j}{i:03d}" for i in range(48)]
        data = _tar(keys, set(keys[::48 // n_bad][:n_bad]))
        (root / f"shard-{j:06d}.tar").write_bytes(data)
        infos.append(ShardInfo(f"shard-{j:06d}.tar", 48, len(data)))
    write_manifest(str(root), Manifest(num_classes=NUM_CLASSES, shards=infos))
    write_classes(str(root), [ClassInfo(i, f"class{i}") for i in range(NUM_CLASSES)])
    out = str(tmp_path / "ddp")
    mp.spawn(_train_rank, args=(2, 29500 + os.getpid() % 1000 + 7, str(root), out), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in (0, 1)]
    own = [r["own"]["skipped"] for r in ranks]
    assert own[0] > 0 and own[1] > 0, own  # both ranks met bad samples
    for record in (r["final"] for r in ranks):  # every rank builds the same job-wide record
        assert record["data/skipped"] == sum(own) and record["data/skipped_bad_image"] == sum(own)
        assert record["data/read"] == sum(r["own"]["read"] for r in ranks)
        assert record["data/bad_fraction"] == pytest.approx(sum(own) / record["data/read"])
        assert record["data/batches"] == sum(r["own"]["batches"] for r in ranks)
    assert ranks[0]["lines"][-1].startswith("step 6/6 ") and ranks[0]["lines"][-1].endswith(f"skipped {sum(own):.0f}")
    assert not ranks[1]["lines"]  # only rank 0 writes the record out
