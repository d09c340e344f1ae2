"""Indexing existing shards: the ranged header walk (`pipeline.data.adopt.scan.scan_shard`) against reading each
shard whole (the peer: what counting with webdataset's tar iterator costs), on the embedded S3 server.

For each image size (JPEG of random-textured photos-like content; `webdataset.ShardWriter`, `.cls` labels) and
read-ahead block, it reports the bytes fetched (s3fs's ranged GETs, counted by wrapping `S3File._fetch_range`), the
number of GETs, and the wall time of indexing every shard with `index.workers` threads, next to the peer reading
the same shards whole with the same threads. Over a real network each GET also costs a round trip (tens of ms
to S3), which the local server does not show: the request count is the number to scale by.

    python tests/benchmarks/index_shards.py --out benchmark-results/index_shards.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import s3fs
import webdataset as wds
from PIL import Image

from pipeline.config import IndexConfig
from pipeline.data.adopt import index_shards
from pipeline.storage import read_bytes, upload_file
from pipeline.storage.local_s3 import LocalS3

SIZES = {"small (256 px)": 256, "medium (512 px)": 512, "large (1024 px)": 1024}


def photo(n: int, side: int) -> bytes:
    """A JPEG that compresses like a photo (smooth shapes plus mild noise), quality 90."""
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[0:side, 0:side * 4 // 3] / side
    channels = [np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 6, (*xx.shape, 3))).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


class Fetches:
    """Bytes and GETs s3fs's ranged reads return, counted around S3File._fetch_range."""

    def __init__(self) -> None:
        self.bytes = self.requests = 0
        self.lock = threading.Lock()
        original = s3fs.core.S3File._fetch_range

        def counted(file: s3fs.core.S3File, start: int, end: int) -> bytes:
            data = original(file, start, end)
            with self.lock:
                self.bytes, self.requests = self.bytes + len(data), self.requests + 1
            return data

        s3fs.core.S3File._fetch_range = counted

    def take(self) -> tuple[int, int]:
        with self.lock:
            out, self.bytes, self.requests = (self.bytes, self.requests), 0, 0
        return out


def write_set(prefix: str, side: int, shards: int, per_shard: int, work: Path) -> int:
    folder = work / f"{side}"
    folder.mkdir()
    images = [photo(n, side) for n in range(16)]  # 16 distinct images, reused: sizes are what matters
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for n in range(shards * per_shard):
            writer.write({"__key__": f"s{n:07d}", "jpg": images[n % 16], "cls": n % 100})
    total = 0
    for path in sorted(folder.glob("*.tar")):
        upload_file(str(path), f"{prefix}/{path.name}")
        total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", default="benchmark-results/index_shards.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalS3(Path(tmp) / "s3", buckets=["bench"]) as server:
        os.environ.update(server.env())  # this process's clients reach the server (as the tests' fixture does)
        storage = server.storage_config()
        fetches = Fetches()
        for label, side in SIZES.items():
            prefix = f"s3://bench/{side}"
            total = write_set(prefix, side, args.shards, args.per_shard, Path(tmp))
            fetches.take()
            began = time.perf_counter()
            with cf.ThreadPoolExecutor(args.workers) as pool:
                urls = [f"{prefix}/part-{i:06d}.tar" for i in range(args.shards)]
                whole = sum(len(b) for b in pool.map(lambda u: read_bytes(u, storage), urls))
            fetches.take()  # whole-object reads are not ranged GETs; keep the counter for the index
            peer = {"seconds": time.perf_counter() - began, "bytes": whole}
            for block in args.blocks:
                options = IndexConfig(labels="cls", block_kib=block, workers=args.workers, progress=False)
                began = time.perf_counter()
                report = index_shards(prefix, f"s3://bench/index-{side}-{block}", options, storage)
                seconds = time.perf_counter() - began
                fetched, requests = fetches.take()
                assert report.manifest.num_samples == args.shards * args.per_shard
                rows.append({"images": label, "mean_sample_kb": total / report.manifest.num_samples / 1024,
                             "shard_mb": total / args.shards / 2**20, "block_kib": block, "read_bytes": fetched,
                             "read_fraction": fetched / total, "gets": requests, "index_s": seconds,
                             "whole_read_s": peer["seconds"], "whole_bytes": peer["bytes"]})
    print(f"{'images':16} {'sample KB':>9} {'block':>6} {'read':>8} {'GETs':>6} {'index s':>8} {'whole-read s':>12}")
    for r in rows:
        print(f"{r['images']:16} {r['mean_sample_kb']:9.0f} {r['block_kib']:5d}K {r['read_fraction']:8.1%} "
              f"{r['gets']:6d} {r['index_s']:8.2f} {r['whole_read_s']:12.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
