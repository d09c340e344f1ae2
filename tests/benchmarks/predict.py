"""Batch prediction speed: the Ray Data job (`pipeline.inference.predict`) against a plain eager PyTorch loop over the
same images, same model, same decode, in the same run; images/s and images/s per CPU core.

The peer is what one writes by hand: one process iterating the shards' tars (webdataset), decoding each image with
`pipeline.data.loading.decode.decode_image` (the evaluator's center crop) into a batch, and running the model in eval
mode with `torch.set_num_threads(cores)`, top-k on the sigmoid scores; nothing written. The Ray Data job is
`run_prediction` on a local Ray of `cores` CPUs (started outside the timing), end to end: planning, actor start-up and
model load, reading, decoding, the model, and writing Parquet parts with their progress markers. Both use the `demo`
preset's model (width x0.25, 2 middle blocks, 128 px; weights do not change the speed), fp32.

    python tests/benchmarks/predict.py --out benchmark-results/predict.json
    python tests/benchmarks/predict.py --input s3://bucket/some/shards --images 2000

Default input: the demo's cached training shards (3,000 images at 160 px, `python jobs/train_multilabel.py` makes
them); any dataset prefix of shards works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.config import Config, load_config
from pipeline.data.format import read_manifest
from pipeline.data.loading import decode_image, empty_image
from pipeline.inference.predict import run_prediction
from pipeline.models import build_model, preprocess_input
from pipeline.storage import open_read
from pipeline.train.step import build_train_state

DEMO = "~/.cache/xception-pipeline/demo/v2-openmoji-160px-seed0-3000-500-catalog100-min3/train"


def eager_loop(config: Config, shards: list[str], limit: int, cores: int, batch_size: int) -> dict[str, float]:
    """The plain peer: tar iteration, decode into a batch, model forward, top-k; images/s."""
    torch.set_num_threads(cores)
    model = build_model(config).eval()
    size, augment = config.data.image_size, config.data.augment
    batch = torch.stack([empty_image(size) for _ in range(batch_size)]).contiguous(memory_format=torch.channels_last)
    start, count, filled = time.perf_counter(), 0, 0

    def flush(n: int) -> None:
        with torch.inference_mode():
            torch.sigmoid(model(preprocess_input(batch[:n]))).topk(5, dim=1)

    for url in shards:
        with open_read(url) as stream:
            for sample in group_by_keys({**f, "__url__": url} for f in tar_file_iterator(stream)):
                if count == limit:
                    break
                decode_image(sample["jpg"], size, augment, train=False, rng=random.Random(0), out=batch[filled])
                filled, count = filled + 1, count + 1
                if filled == batch_size:
                    flush(filled)
                    filled = 0
    if filled:
        flush(filled)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def ray_job(config: Config, output: str) -> dict[str, float]:
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    summary = run_prediction(config)
    seconds = time.perf_counter() - start
    return {"images": summary["images"], "seconds": seconds, "images_per_s": summary["images"] / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=os.path.expanduser(DEMO), help="a dataset prefix of shards")
    parser.add_argument("--images", type=int, default=3000, help="at most this many images (whole shards for Ray)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmark-results/predict.json")
    args = parser.parse_args()

    import ray

    manifest = read_manifest(args.input)
    shards, kept, total = [], [], 0
    for url, info in zip(manifest.shard_urls(args.input), manifest.shards, strict=True):
        if total < args.images:
            shards.append(url)
            kept.append(info)
            total += info.samples
    work = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    subset = work / "input"  # whole shards, so both sides see exactly the same images
    subset.mkdir()
    (subset / "manifest.json").write_text(json.dumps({**json.loads((Path(args.input) / "manifest.json").read_text()),
                                                      "num_samples": total,
                                                      "shards": [{"url": u, "samples": i.samples, "bytes": i.bytes}
                                                                 for u, i in zip(shards, kept, strict=True)]}))
    shutil.copy(Path(args.input) / manifest.classes, subset / manifest.classes)
    base = load_config("demo", [f"model.num_classes={manifest.num_classes}", f"data.train={subset}",
                                f"run.storage={work}/runs", "checkpoint.background=false",
                                f"predict.input={subset}", f"predict.batch_size={args.batch_size}",
                                "predict.progress=false"])
    Checkpointer(base.run_dir, base).save(1, build_train_state(base).state_dict())
    first_peer = eager_loop(base, shards, total, args.cores, args.batch_size)
    ray.init(address="local", num_cpus=args.cores, include_dashboard=False)  # never a cluster already running here
    variants = {
        "ray data, 1 replica x 1 CPU, decode tasks 0.5 CPU": dict(concurrency=1, num_cpus=1.0, decode_cpus=0.5),
        f"ray data, {args.cores} replicas x 0.75 CPU, decode tasks 0.25 CPU": dict(
            concurrency=args.cores, num_cpus=0.75, decode_cpus=0.25),
    }
    results = {"eager loop (peer), before": first_peer}
    for name, settings in variants.items():
        config = base.model_copy(update={"predict": base.predict.model_copy(update={
            **settings, "output": str(work / "out")})})
        results[name] = ray_job(config, str(work / "out"))
    ray.shutdown()
    results["eager loop (peer), after"] = eager_loop(base, shards, total, args.cores, args.batch_size)
    # The peer runs before and after the Ray jobs: on a shared machine the load drifts; compare with their mean.
    peer = {"images_per_s": (first_peer["images_per_s"] + results["eager loop (peer), after"]["images_per_s"]) / 2}
    shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"\n{total} images ({len(shards)} shards, {base.data.image_size} px, demo model), {args.cores} cores, "
          f"load average {load:.1f} at the end")
    print(f"{'run':<58} {'s':>7} {'img/s':>8} {'img/s/core':>11} {'vs peer mean':>13}")
    for name, r in results.items():
        r["images_per_s_per_core"] = r["images_per_s"] / args.cores
        r["vs_peer"] = r["images_per_s"] / peer["images_per_s"]
        print(f"{name:<58} {r['seconds']:7.1f} {r['images_per_s']:8.1f} {r['images_per_s_per_core']:11.1f} "
              f"{r['vs_peer']:12.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"input": args.input, "images": total, "cores": args.cores, "batch_size": args.batch_size,
                               "platform": platform.platform(), "torch": torch.__version__, "load_average_end": load,
                               "results": results},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
