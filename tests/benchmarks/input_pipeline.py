"""Input-pipeline benchmark: decode + augment to 299x299 from WebDataset shards on the embedded S3 server.

Compares, on the same shards and the same storage reads, per process and in total:
  (a) this loader (`pipeline.data.ShardStream`, training mode) with each `data.decoder`;
  (b) the plain PIL pipeline as open_clip runs it: full-size decode, RandomResizedCrop-equivalent crop, bilinear
      resize (torchvision's default; open_clip's bicubic would cost more), horizontal flip, to a float tensor in
      [0, 1] (ToTensor), batched by torch's default_collate in DataLoader workers and handed to the main process,
      as open_clip feeds training and as (a) is measured. The goal is judged against (b);
  (b1) the same ending in uint8 (PILToTensor) instead of float, as timm's loader hands images over: a quarter
      of (b)'s bytes to batch and hand over;
  (b0) the per-sample transform of (b) alone in independent processes: no batching, no hand-off;
  (c) simplejpeg full-size decode only, the cost of merely decompressing every pixel.
with 1 and 2 processes ((a), (b): DataLoader workers of one rank; (b0), (c): independent processes over disjoint
shards). Rates: samples per CPU-second of the processes doing the work, main process included where there is one
(the per-core cost, robust on a shared machine) and total samples per wall-second; each is the best of `--passes`
timed passes after a warm-up pass.
Images: real photos shipped with scikit-image, randomly cropped to 4:3 and resized to ~500x375 and ~1024x768
(JPEG quality 90); if scikit-image is missing, textured images generated with numpy. Each measurement times a
second pass (workers started, storage client warm). Goal: (a) >= 2x (b); the table also gives a / b0.

    python tests/benchmarks/input_pipeline.py --out benchmark-results/input_pipeline.json [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

IMAGE_SIZE = 299
DEFAULT_DECODER = "simplejpeg"  # DataConfig.decoder's default, chosen from this benchmark
SIZES = {"500x375": (500, 375), "1024x768": (1024, 768)}
BATCH = 32
GOAL = 2.0


# ------------------------------------------------------------------------------------------------------- images


def photo_source() -> tuple[str, list[np.ndarray]]:
    try:
        import skimage.data as data
    except ImportError:
        rng = np.random.default_rng(0)
        images = []
        for _ in range(6):
            yy, xx = np.mgrid[0:900, 0:1200].astype(np.float32)
            f = rng.uniform(0.005, 0.05, 3)
            base = np.stack([np.sin(xx * f[0] + yy * f[1]) * 80 + 128, np.cos(yy * f[2]) * 80 + 128,
                             (xx + yy) % 256], axis=-1)
            images.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
        return "textured images generated with numpy (scikit-image not installed)", images
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]
    return ("photos shipped with scikit-image (" + ", ".join(names) + "), random 4:3 crops resized to the target "
            "size (1024x768 images from photos smaller than that are upsampled, so they hold less fine detail)",
            [getattr(data, n)()[..., :3] for n in names])


def make_jpeg(photo: np.ndarray, size: tuple[int, int], rng: random.Random) -> bytes:
    h, w = photo.shape[:2]
    scale = rng.uniform(0.6, 1.0)
    cw = min(w, int(min(w, h * 4 / 3) * scale))
    ch = int(cw * 3 / 4)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_dataset(prefix: str, size: tuple[int, int], count: int, shards: int, photos: list[np.ndarray],
                  distinct: int | None = None) -> float:
    """Shards written with the project's ShardWriter; returns the mean JPEG size in bytes. With `distinct`, only
    that many JPEGs are encoded and the rest repeat them: decoding costs the same, writing many images far less."""
    from pipeline.config import ShardsConfig
    from pipeline.data.format import ClassInfo
    from pipeline.data.writing import Sample, ShardWriter

    rng = random.Random(0)
    samples = []
    for n in range(count):
        labels = sorted(rng.sample(range(100), rng.randint(1, 5)))
        reuse = distinct is not None and n >= distinct
        image = samples[n % distinct].image if reuse else make_jpeg(photos[n % len(photos)], size, rng)
        samples.append(Sample(key=f"img{n:06d}", labels=labels, image=image))
    options = ShardsConfig(samples_per_shard=-(-count // shards), max_image_side=max(size), workers=1, progress=False)
    ShardWriter(prefix, [ClassInfo(i, f"c{i}") for i in range(100)], options=options).write(samples)
    return float(np.mean([len(s.image) for s in samples]))


# ---------------------------------------------------------------------------------------------------- baselines


def _samples(urls: list[str]):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from pipeline.storage import open_read

    for url in urls:
        with open_read(url) as stream:
            yield from group_by_keys({**f, "__url__": url} for f in tar_file_iterator(stream))


def _plain_pil(sample: dict, rng: random.Random, to_float: bool = True) -> object:
    """open_clip's train transform with torchvision's default (bilinear) resize and a flip; `to_float`: ToTensor
    (open_clip), else PILToTensor's uint8 (timm's fast_collate path, normalising on the GPU)."""
    from pipeline.config import AugmentConfig
    from pipeline.data.loading.decode import random_resized_crop_box

    json.loads(sample["json"])
    image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")  # full-size decode
    box = random_resized_crop_box(image.width, image.height, AugmentConfig(), rng)
    image = image.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # torchvision's ToTensor: copy, HWC -> CHW contiguous, float in [0, 1]; PILToTensor stops before the float
    chw = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div(255) if to_float else chw


def _raw_decode(sample: dict, rng: random.Random) -> object:
    import simplejpeg

    return simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB")


class PlainPilBatches(IterableDataset):
    """(b), (b1): `_plain_pil` per sample in DataLoader workers, batched with torch's default_collate, endlessly.

    Each worker takes every num_workers-th shard, as webdataset's split_by_worker does.
    """

    def __init__(self, urls: list[str], to_float: bool) -> None:
        super().__init__()
        self.urls, self.to_float = urls, to_float

    def __iter__(self):
        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info is not None else self.urls
        rng = random.Random(0 if info is None else info.id)
        images, labels = [], []
        while True:
            for sample in _samples(mine):
                images.append(_plain_pil(sample, rng, self.to_float))
                labels.append(json.loads(sample["json"])["labels"])
                if len(images) == BATCH:
                    yield {"images": default_collate(images), "labels": labels}
                    images, labels = [], []


def run_plain_pil_loader(urls: list[str], samples: int, processes: int, passes: int, to_float: bool) -> dict:
    torch.set_num_threads(1)
    loader = DataLoader(PlainPilBatches(urls, to_float), batch_size=None, num_workers=processes,
                        multiprocessing_context=multiprocessing.get_context("forkserver"))
    return _time_batches(iter(loader), samples // BATCH, passes, processes, lambda batch: len(batch["labels"]))


def _time_batches(iterator: Iterator[Any], per_pass: int, passes: int, processes: int,
                  size: Callable[[Any], int]) -> dict:
    """Rates of a DataLoader-fed iterator over `per_pass` batches (`size(batch)` samples each), best of `passes`
    after a warm-up pass (worker start-up, storage clients); CPU of the workers and the main process."""
    for _ in range(per_pass):
        next(iterator)
    wall_rates, cpu_rates = [], []
    for _ in range(passes):
        wall, cpu, count = time.perf_counter(), time.process_time() + _children_cpu_s(), 0
        for _ in range(per_pass):
            count += size(next(iterator))
        wall_rates.append(count / (time.perf_counter() - wall))
        cpu_rates.append(count / (time.process_time() + _children_cpu_s() - cpu))  # workers + main process
    best = max(wall_rates)
    return {"samples_per_s": best, "per_process": best / processes, "per_cpu_s": max(cpu_rates)}


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's live descendants, except the S3 server.

    Descendants, not children: DataLoader workers start from a fork server, so they are grandchildren."""
    tick, processes = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        processes[int(entry)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / tick)
    total, parents = 0.0, {os.getpid()}
    while True:
        found = {pid for pid, (ppid, comm, _) in processes.items()
                 if ppid in parents and pid not in parents and comm != "weed"}
        if not found:
            return total
        total += sum(processes[pid][2] for pid in found)
        parents |= found


def _baseline_worker(args: tuple[str, list[str], int]) -> list[tuple[int, float, float]]:
    torch.set_num_threads(1)
    kind, urls, passes = args
    fn = _plain_pil if kind == "plain_pil" else _raw_decode
    rng = random.Random(0)
    for sample in _samples(urls):  # warm-up pass
        fn(sample, rng)
    out = []
    for _ in range(passes):
        wall, cpu, count = time.perf_counter(), time.process_time(), 0
        for sample in _samples(urls):
            fn(sample, rng)
            count += 1
        out.append((count, time.perf_counter() - wall, time.process_time() - cpu))
    return out


def run_baseline(kind: str, urls: list[str], processes: int, passes: int) -> dict:
    parts = [(kind, urls[i::processes], passes) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_baseline_worker, parts)
    wall = [max(c / w for c, w, _ in worker) for worker in results]  # best pass of each process
    cpu = [max(c / u for c, _, u in worker) for worker in results]
    return {"samples_per_s": sum(wall), "per_process": float(np.mean(wall)), "per_cpu_s": float(np.mean(cpu))}


def run_loader(prefix: str, decoder: str, processes: int, passes: int) -> dict:
    from pipeline.config import DataConfig
    from pipeline.data.loading import ShardStream

    torch.set_num_threads(1)
    data = DataConfig(image_size=IMAGE_SIZE, loader_workers=processes, decoder=decoder, shuffle_buffer=64)
    stream = ShardStream(prefix, data, batch_size=BATCH, rank=0, world_size=1, train=True)
    return _time_batches(iter(stream), stream.batches_per_epoch(), passes, processes, len)


# --------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmark-results/input_pipeline.json")
    parser.add_argument("--quick", action="store_true", help="fewer images (noisier numbers)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per measurement (the best counts)")
    args = parser.parse_args(argv)
    counts = {"500x375": 256, "1024x768": 128} if args.quick else {"500x375": 1024, "1024x768": 512}
    processes = [int(p) for p in args.processes.split(",")]

    from pipeline.data.format import read_manifest
    from pipeline.storage.local_s3 import LocalS3

    source, photos = photo_source()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalS3(Path(tmp), buckets=["bench"]) as server:
        os.environ.update(server.env())
        for name, size in SIZES.items():
            prefix = f"s3://bench/{name}"
            mean_bytes = write_dataset(prefix, size, counts[name], 8, photos)
            urls = read_manifest(prefix).shard_urls(prefix)
            for p in processes:
                row = {"images": name, "processes": p, "samples": counts[name], "mean_jpeg_bytes": round(mean_bytes)}
                for decoder in ("pil_draft", "simplejpeg"):
                    row[f"loader_{decoder}"] = run_loader(prefix, decoder, p, args.passes)
                row["plain_pil"] = run_plain_pil_loader(urls, counts[name], p, args.passes, to_float=True)
                row["plain_pil_uint8"] = run_plain_pil_loader(urls, counts[name], p, args.passes, to_float=False)
                row["plain_pil_transform"] = run_baseline("plain_pil", urls, p, args.passes)
                row["raw_simplejpeg_decode"] = run_baseline("raw_decode", urls, p, args.passes)
                for peer in ("plain_pil", "plain_pil_uint8", "plain_pil_transform"):
                    row[f"speedup_vs_{peer}"] = {d: row[f"loader_{d}"]["per_cpu_s"] / row[peer]["per_cpu_s"]
                                                 for d in ("pil_draft", "simplejpeg")}
                row["goal_met"] = row["speedup_vs_plain_pil"][DEFAULT_DECODER] >= GOAL
                rows.append(row)
                print(f"done {name} x{p}", file=sys.stderr, flush=True)

    header = ("images", "procs", "(a) loader pil_draft", "(a) loader simplejpeg", "(b) plain PIL in DataLoader",
              "(b1) same, uint8", "(b0) plain PIL transform only", "(c) raw decode", "a/b", "a/b1", "a/b0",
              f"goal a>={GOAL:g}x b")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        def cell(key: str, r: dict = r) -> str:
            return f"{r[key]['per_cpu_s']:.0f} / {r[key]['samples_per_s']:.0f}"
        lines.append("| " + " | ".join([
            r["images"], str(r["processes"]), cell("loader_pil_draft"), cell("loader_simplejpeg"), cell("plain_pil"),
            cell("plain_pil_uint8"), cell("plain_pil_transform"), cell("raw_simplejpeg_decode"),
            f"{r['speedup_vs_plain_pil'][DEFAULT_DECODER]:.2f}x",
            f"{r['speedup_vs_plain_pil_uint8'][DEFAULT_DECODER]:.2f}x",
            f"{r['speedup_vs_plain_pil_transform'][DEFAULT_DECODER]:.2f}x",
            "PASS" if r["goal_met"] else "FAIL"]) + " |")
    table = "\n".join(lines)
    print(f"decode + augment to {IMAGE_SIZE}x{IMAGE_SIZE} from S3 shards; cells: samples per CPU-second of the "
          "processes doing the work (per-core cost) / total samples per wall-second (best of "
          f"{args.passes} passes). Ratios and the goal use the per-CPU-second rate (default decoder "
          f"{DEFAULT_DECODER}); wall rates depend on what else runs on the machine. (a) and (b) deliver batches to "
          "a main process (counted); (b0) and (c) only transform or decode.")
    print(table)
    result = {"benchmark": "input_pipeline", "image_size": IMAGE_SIZE, "batch_size": BATCH, "images": source,
              "quick": args.quick, "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "machine": platform.machine(), "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["goal_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
