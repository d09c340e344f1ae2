"""GPU acceptance run: the project's GPU figures measured in one command, each next to its peer from the same run.

Parts (`--parts`, default all), each in its own process under a time cap, so that a compile, a collective or a
loader that hangs costs its part and not the run:

  a  train step, full Xception at 299 px, per-GPU batch 128 and 256: fp32, bf16 autocast, channels_last and
     torch.compile (default, max-autotune) of the pipeline's step (`build_train_state` / `train_step`), against a
     plain eager PyTorch step of the same model (torch.optim RMSprop, nn.BCEWithLogitsLoss, no pipeline code);
  b  the whole training loop (`pipeline.train.loop.train`) fed by the streaming loader from local shards: images/s
     and the data-wait fraction against the step alone; the loader's decode rate per CPU core, hence the cores per
     GPU that keep the wait under 5%; GPU JPEG decoding (torchvision or nvImageCodec) where one is importable;
  c  host synchronisations per step (torch.cuda.set_sync_debug_mode) of the pipeline's step and loop step against
     the plain step, and the per-step cost of the stop agreement (`StopAgreement.agree`, 2 ranks on an NCCL group,
     agreeing over its gloo side group) against the device all-reduce and host read that the side group avoids;
  d  MAP@100 on CUDA at 14,000 x 6,000 (one-shot, FastEval14k) and 100,000 x 17,000 (streamed, JFT) against the
     CPU path on the same scores;
  e  the `multilabel` preset's learning curve on the demo data at 299 px against the class-prior and random scores.

`--dry-run` runs every part at toy size on the CPU (tests/test_gpu_acceptance.py does, so the script cannot rot).
Without it and without CUDA every part says so in the table. Prints one table and writes JSON, rewritten after each
part so that a run cut short keeps what it measured. Part (e) reads the demo data from `--demo-location`; make it
beforehand where the `demo` extra is installed (`--prepare-demo DIR`): the GPU machine may not have it.

    python tests/benchmarks/gpu_acceptance.py --out benchmark-results/gpu_acceptance.json
    python tests/benchmarks/gpu_acceptance.py --parts a d          # a rerun of some parts
    python tests/benchmarks/gpu_acceptance.py --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from input_pipeline import _samples, photo_source, run_loader, write_dataset  # siblings: run as a script
from learning import run_pipeline
from map_at_k import make_batch, make_dataset
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import correct, matmul_rate

from pipeline.config import Config, load_config, validate
from pipeline.config.loading import apply_overrides, read_preset_or_file
from pipeline.data.demo import prepare_demo_data
from pipeline.data.format import read_manifest
from pipeline.data.loading import ShardStream, Split, train_plan
from pipeline.evaluation import MeanAveragePrecisionAtK, map_at_k
from pipeline.models import build_model, xception_macs
from pipeline.train.loop import next_batch, train
from pipeline.train.ranks import WorkerContext
from pipeline.train.step import build_train_state, train_step
from pipeline.train.stopping import StopAgreement

K = 100
WAIT_GOAL = 0.05  # the data-wait fraction the loader must stay under
PART_NAMES = {"a": "train step", "b": "loop and loader", "c": "host syncs and stop agreement", "d": "MAP@100",
              "e": "learning curve"}


# ------------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Scale:
    """The sizes of a run: the acceptance run on one GPU, or its toy rehearsal on the CPU (`--dry-run`)."""

    image_size: int
    model: tuple[str, ...]  # overrides that size the model (none: the paper's Xception)
    num_classes: int
    batch_sizes: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    compile_backend: str
    loop_images: int  # the loader's shards: images, of which distinct JPEGs, in shards, at jpeg_size
    distinct_jpegs: int
    shards: int
    jpeg_size: tuple[int, int]
    loop_workers: int
    loop_steps: int
    decode_passes: int
    agree_steps: int
    sync_steps: int
    map_sizes: tuple[tuple[int, int], tuple[int, int]]  # (images, classes): one-shot, streamed
    map_batch: int
    curve: tuple[str, ...]  # overrides of the multilabel preset (with the demo preset's dataset)
    curve_eval_every: int
    caps: dict[str, float]  # seconds per part, then the part is stopped
    notes: dict[str, str] = field(default_factory=dict)


GPU = Scale(
    image_size=299, model=(), num_classes=1000, batch_sizes=(128, 256), warmup_steps=3, timed_steps=10,
    compile_backend="inductor", loop_images=4096, distinct_jpegs=256, shards=16, jpeg_size=(500, 375),
    loop_workers=8, loop_steps=60, decode_passes=2, agree_steps=500, sync_steps=3,
    map_sizes=((14_000, 6_000), (100_000, 17_000)), map_batch=10_000,
    # 3 loader workers, not the preset's 8: each worker fills whole batches of 256 from its own shards, so with the
    # demo's 12 shards of 250 images 8 workers would train on 1,024 of its 3,000 images an epoch, 3 on 2,304
    curve=("train.total_steps=300", "data.loader_workers=3"), curve_eval_every=100,
    caps={"a": 180, "b": 80, "c": 45, "d": 45, "e": 120},  # ~8 min on one H100, with start-up
)
DRY = Scale(
    image_size=71, model=("model.width_multiplier=0.125", "model.middle_blocks=1"), num_classes=100,
    batch_sizes=(2, 4), warmup_steps=1, timed_steps=2,
    # Inductor compiles the toy model in ~85 s on 2 cores from a cold cache; the eager backend runs the same
    # Dynamo capture in ~2 s, so the dry run still takes torch.compile's path through the step.
    compile_backend="eager", loop_images=64, distinct_jpegs=8, shards=2, jpeg_size=(160, 120),
    loop_workers=1, loop_steps=4, decode_passes=1, agree_steps=20, sync_steps=2,
    map_sizes=((700, 300), (2_000, 400)), map_batch=500,
    curve=("train.total_steps=4", "train.global_batch_size=8", "train.log_every=2", "data.image_size=71",
           "data.loader_workers=1", "data.shuffle_buffer=16", "model.width_multiplier=0.125", "model.middle_blocks=1",
           "data.demo.variant=tiny", "data.demo.train_images=64", "data.demo.eval_images=32",
           "data.demo.image_size=71", "data.demo.images_per_shard=32", "eval.batch_size=32"),
    curve_eval_every=2,
    caps={"a": 120, "b": 120, "c": 120, "d": 60, "e": 120},
    notes={"a": "dry run: torch.compile's eager backend (Inductor takes ~85 s on the toy model on 2 cores)"},
)


# ------------------------------------------------------------------------------------------------------ rows


def row(what: str, figure: float, unit: str, peer: str, peer_figure: float | None, better: str | None = "higher",
        note: str = "", **details: Any) -> dict:
    """One line of the table: a figure, the peer it is judged against (measured in the same run), which way is
    better ("higher", "lower", or None when the two are not alternatives), and a note."""
    return {"what": what, "figure": figure, "unit": unit, "peer": peer, "peer_figure": peer_figure,
            "better": better, "note": note, **details}


class Part:
    """What a part's process has: its sizes, device, scratch folder, clock; its rows, saved after each one (the
    parent reads them back even when it has to stop the part at its cap)."""

    def __init__(self, name: str, scale: Scale, device: torch.device, workdir: Path, out: Path,
                 options: argparse.Namespace) -> None:
        self.name, self.scale, self.device, self.workdir, self.out = name, scale, device, workdir, out
        self.options = options
        self.started = time.perf_counter()
        # The device is named at the end: naming it initialises CUDA, which part (c) must not do before it forks.
        self.record: dict[str, Any] = {"rows": [], "running": None, "details": {}, "device": None}

    def left(self) -> float:
        """Seconds left of the part's cap."""
        return self.scale.caps[self.name] - (time.perf_counter() - self.started)

    def plan(self, whats: list[str]) -> None:
        """The rows this part means to add: any the cap keeps it from reaching are listed as not reached."""
        self.record["planned"] = whats
        self.save()

    def running(self, what: str) -> None:
        """Note what starts now: if the cap stops the part, the table names it."""
        self.record["running"] = what
        self.save()

    def add(self, line: dict) -> None:
        self.record["rows"].append(line)
        self.record["running"] = None
        self.save()
        print(f"[{self.name} {time.perf_counter() - self.started:5.0f} s] {progress(line)}", flush=True)

    def save(self) -> None:
        self.out.write_text(json.dumps(self.record, indent=1, default=str))


def progress(line: dict) -> str:
    if "figure" not in line:
        return f"{line['what']}: {line.get('skipped') or line.get('error')}"
    peer = fmt(line["peer_figure"]) if line["peer_figure"] is not None else "n/a"
    return f"{line['what']}: {fmt(line['figure'])} {line['unit']} (peer {line['peer']}: {peer})"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu, {os.cpu_count()} cores (torch {torch.__version__})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ (a) step


@dataclass(frozen=True)
class Variant:
    """A way to run the step: the pipeline's (with config overrides, maybe compiled) or the plain loop's."""

    name: str
    overrides: tuple[str, ...]
    plain: bool = False
    compile_mode: str | None = None  # "default" or "max-autotune"
    peer: str | None = None


FP32 = ("train.precision=fp32", "train.channels_last=false")
BF16 = ("train.precision=bf16", "train.channels_last=false")
FP32_CL = ("train.precision=fp32", "train.channels_last=true")
BF16_CL = ("train.precision=bf16", "train.channels_last=true")
PRESET_DEFAULT = Variant("bf16 channels_last", BF16_CL, peer="plain bf16 channels_last")  # the presets' setting
EAGER = (Variant("plain fp32", FP32, plain=True), Variant("fp32", FP32, peer="plain fp32"),
         Variant("bf16 autocast", BF16, peer="fp32"), Variant("fp32 channels_last", FP32_CL, peer="fp32"),
         Variant("plain bf16 channels_last", BF16_CL, plain=True), PRESET_DEFAULT)
COMPILED = (Variant("bf16 channels_last compile", BF16_CL, compile_mode="default", peer="bf16 channels_last"),
            Variant("bf16 channels_last compile max-autotune", BF16_CL, compile_mode="max-autotune",
                    peer="bf16 channels_last"))


def step_config(scale: Scale, batch: int, overrides: tuple[str, ...]) -> Config:
    """The paper's preset at this run's size and batch."""
    return load_config("jft_xception", [f"model.num_classes={scale.num_classes}", f"train.global_batch_size={batch}",
                                        f"data.image_size={scale.image_size}", *scale.model, *overrides])


def synthetic_batch(config: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of preprocessed images and ~1% positive targets (a fixed batch: the loss must fall)."""
    generator = torch.Generator().manual_seed(0)
    size, batch, classes = config.data.image_size, config.train.global_batch_size, config.model.num_classes
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    if config.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch, classes, generator=generator) < max(0.01, 2 / classes)).float().to(device)
    return images, targets


def plain_step(config: Config, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The peer: a plain PyTorch step of the same model (RMSprop with the preset's settings, BCEWithLogitsLoss,
    autocast as configured) and nothing else: no EMA, no gradient norm, no host reads."""
    torch.manual_seed(config.train.seed)
    model = build_model(config).to(images.device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = config.optimizer
    optimizer = torch.optim.RMSprop(model.parameters(), lr=opt.lr, alpha=opt.rmsprop_decay, eps=opt.epsilon,
                                    momentum=opt.momentum, weight_decay=opt.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    bf16 = config.train.precision == "bf16"

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def compile_options(mode: str, scale: Scale) -> dict[str, Any]:
    if scale.compile_backend != "inductor":
        return {"backend": scale.compile_backend}
    return {} if mode == "default" else {"mode": mode}


def pipeline_step(config: Config, images: torch.Tensor, targets: torch.Tensor, compile_with: dict | None
                  ) -> Callable[[], float]:
    """The pipeline's step (`build_train_state` + `train_step`), its model compiled when `compile_with` is given."""
    state = build_train_state(config, images.device)
    if compile_with is not None:
        torch._dynamo.reset()  # a fresh cache per variant: recompiles would count against dynamo's limit
        state.model = torch.compile(state.model, **compile_with)
    return lambda: train_step(state, config, images, targets).loss


def time_steps(step: Callable[[], Any], scale: Scale, batch: int, device: torch.device) -> dict:
    """images/s over the timed steps after the warm-up ones (the first of which compiles); the first step's loss
    (before any update: the same for every variant of the same weights and batch) and the last one's."""
    sync(device)
    start = time.perf_counter()
    first = float(step())
    for _ in range(scale.warmup_steps - 1):
        step()
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(scale.timed_steps):
        last = step()
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": scale.timed_steps * batch / elapsed, "step_s": elapsed / scale.timed_steps,
            "warmup_s": warmup, "loss_first": first, "loss_last": float(last)}


def measure_variant(variant: Variant, batch: int, part: Part) -> dict:
    """One variant's timing, peak memory and losses; its model freed afterwards."""
    config = step_config(part.scale, batch, variant.overrides)
    images, targets = synthetic_batch(config, part.device)
    if part.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(part.device)
    if variant.plain:
        step = plain_step(config, images, targets)
    else:
        compile_with = compile_options(variant.compile_mode, part.scale) if variant.compile_mode else None
        step = pipeline_step(config, images, targets, compile_with)
    result = time_steps(step, part.scale, batch, part.device)
    result["bf16"] = config.train.precision == "bf16"
    if part.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(part.device) / 2**30
    del step
    free_memory()
    return result


def try_variant(variant: Variant, batch: int, part: Part) -> dict:
    """`measure_variant`, with an out-of-memory or any other failure recorded instead of raised."""
    part.running(f"train step b{batch}: {variant.name}")
    try:
        return measure_variant(variant, batch, part)
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory at batch {batch}: {str(error).splitlines()[0][:160]}"}
    except Exception as error:  # a variant that fails here (a compile error, say) is a finding, not a crash
        result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    free_memory()  # out here, the traceback that held the model is gone
    return result


def step_row(variant: Variant, batch: int, results: dict, flops_per_image: float | None, part: Part) -> dict:
    """The table line of a pipeline variant against its peer at the same batch."""
    mine, peer = results[(variant.name, batch)], results.get((variant.peer, batch), {})
    what = f"train step b{batch}: {variant.name}"
    if "error" in mine:
        return {"what": what, "error": mine["error"]}
    reference = results.get(("fp32", batch), {})
    trains = correct(mine, reference) if "loss_first" in reference else None
    note = f"warm-up {mine['warmup_s']:.1f} s; trains like fp32: {'?' if trains is None else 'yes' if trains else 'NO'}"
    if "peak_gib" in mine:
        note += f"; peak {mine['peak_gib']:.1f} GiB"
    if flops_per_image:
        note += f"; {mine['images_per_s'] * flops_per_image / 1e12:.0f} TFLOP/s"
    if part.scale.notes.get("a") and variant.compile_mode:
        note += f"; {part.scale.notes['a']}"
    return row(what, mine["images_per_s"], "img/s", f"{variant.peer} b{batch}", peer.get("images_per_s"),
               note=note, step_s=mine["step_s"], loss=(mine["loss_first"], mine["loss_last"]), trains_like_fp32=trains)


def part_train_step(part: Part) -> None:
    """(a): every eager variant at every batch first, then the compiled ones (the slowest to start), so that the
    cap cuts the costliest measurements."""
    scale, results = part.scale, {}
    full_model = not scale.model
    flops = 3 * 2 * xception_macs(scale.image_size, num_classes=scale.num_classes) if full_model else None
    if part.device.type == "cuda":
        part.record["details"]["bf16_matmul_tflops"] = matmul_rate(torch.bfloat16, part.device) / 1e12
    # compiled: both modes at the first batch before either at the second, since the cap may cut them
    plan = [(v, b) for v in EAGER for b in scale.batch_sizes] + [(v, b) for b in scale.batch_sizes for v in COMPILED]
    part.plan([f"train step b{b}: {v.name}" for v, b in plan if not v.plain])
    for variant, batch in plan:
        if part.left() < 10:
            part.add({"what": f"train step b{batch}: {variant.name}", "skipped": "part (a)'s time cap reached"})
            continue
        results[(variant.name, batch)] = try_variant(variant, batch, part)
        if variant.plain:
            part.record["details"][f"{variant.name} b{batch}"] = results[(variant.name, batch)]
            part.save()
        else:
            part.add(step_row(variant, batch, results, flops, part))


# ------------------------------------------------------------------------------------------ (b) loop, loader


def ensure_shards(part: Part) -> str:
    """The loader's dataset (photos as JPEGs at `jpeg_size`, 100 classes) in the run's scratch folder, written
    once for the parts that need it."""
    prefix = part.workdir / "shards"
    if not (prefix / "manifest.json").exists():
        part.running("writing shards")
        _, photos = photo_source()
        scale = part.scale
        write_dataset(str(prefix), scale.jpeg_size, scale.loop_images, scale.shards, photos, scale.distinct_jpegs)
    return str(prefix)


def loader_overrides(scale: Scale, batch: int) -> tuple[str, ...]:
    """bf16 + channels_last (the presets' defaults), and the loader's workers and a shuffle buffer of a few batches."""
    return (*BF16_CL, f"data.loader_workers={scale.loop_workers}", f"data.shuffle_buffer={4 * batch}")


def loop_config(part: Part, prefix: str, batch: int) -> Config:
    """The paper's preset on the local shards; the loop's rates are its last logged window (the second half)."""
    steps = part.scale.loop_steps
    return step_config(part.scale, batch, (*loader_overrides(part.scale, batch), f"data.train={prefix}",
                                           f"train.total_steps={steps}", f"train.log_every={steps // 2}",
                                           f"checkpoint.every_steps={steps}", "checkpoint.background=false",
                                           f"run.storage={part.workdir / 'runs'}", f"run.name=loop-b{batch}"))


def part_loop(part: Part) -> None:
    """(b): the loop against the step alone, the loader's rate per core, and GPU decoding where importable."""
    prefix, batch = ensure_shards(part), part.scale.batch_sizes[-1]
    alone = try_variant(PRESET_DEFAULT, batch, part)
    if "error" in alone:
        part.add({"what": f"train step alone b{batch}", "error": alone["error"]})
        return
    step_rate = alone["images_per_s"]
    part.running(f"whole loop b{batch}")
    final = train(loop_config(part, prefix, batch), WorkerContext(device=part.device))
    wait = final["data_wait_fraction"]
    workers = part.scale.loop_workers
    part.add(row(f"whole loop b{batch}, loader workers: {workers}", final["samples_per_s"], "img/s",
                 f"train step alone b{batch}", step_rate, note=f"data wait {wait:.1%}"))
    part.add(row(f"data wait in the loop b{batch}, loader workers: {workers}", 100 * wait, "%",
                 "goal (at most)", 100 * WAIT_GOAL, better="lower"))
    per_core = decode_rate(part, prefix)
    cores = (1 - WAIT_GOAL) * step_rate / per_core
    part.add(row("loader decode + augment to 299 (simplejpeg), per CPU core", per_core, "img/s",
                 f"train step alone b{batch}, per GPU", step_rate, better=None,
                 note=f"{part.scale.jpeg_size[0]}x{part.scale.jpeg_size[1]} JPEGs; workers + main process"))
    part.add(row("CPU cores per GPU to keep the data wait under 5%", cores, "cores", "cores on this machine",
                 float(os.cpu_count() or 1), better="lower", note="for loader workers; training needs one more"))
    gpu_decoding(part, prefix, step_rate, per_core)


def decode_rate(part: Part, prefix: str) -> float:
    """Samples per CPU-second of the loader (2 workers and the main process: input_pipeline.py's measure)."""
    part.running("loader decode rate")
    threads = torch.get_num_threads()
    try:
        return run_loader(prefix, "simplejpeg", 2, part.scale.decode_passes)["per_cpu_s"]
    finally:
        torch.set_num_threads(threads)  # run_loader sets 1, as a DataLoader worker has


def gpu_decoders() -> dict[str, Callable[[], Callable[[list[bytes], torch.device], list[torch.Tensor]]]]:
    """The GPU JPEG decoders importable here, by name (each a factory of a decode function)."""
    found = {}
    with contextlib.suppress(ImportError):
        from torchvision.io import decode_jpeg  # noqa: F401

        found["torchvision.io.decode_jpeg"] = _torchvision_decoder
    with contextlib.suppress(ImportError):
        from nvidia import nvimgcodec  # noqa: F401

        found["nvImageCodec"] = _nvimgcodec_decoder
    return found


def _torchvision_decoder() -> Callable[[list[bytes], torch.device], list[torch.Tensor]]:
    from torchvision.io import decode_jpeg

    def decode(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        return decode_jpeg(data, device=device)  # (3, H, W) uint8 each

    return decode


def _nvimgcodec_decoder() -> Callable[[list[bytes], torch.device], list[torch.Tensor]]:
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder()

    def decode(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
        return [torch.as_tensor(image, device=device).permute(2, 0, 1) for image in decoder.decode(jpegs)]

    return decode


def decode_on_device(decode: Callable, jpegs: list[bytes], size: int, device: torch.device) -> float:
    """Images per device-second: decode and resize to `size` (best of a few repeats after a warm-up)."""
    def once() -> None:
        images = decode(jpegs, device)
        torch.stack([nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                               antialias=True)[0] for image in images])

    once()
    best = 0.0
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        once()
        sync(device)
        best = max(best, len(jpegs) / (time.perf_counter() - start))
    return best


def gpu_decoding(part: Part, prefix: str, step_rate: float, per_core: float) -> None:
    """GPU JPEG decoding as a variant: worth keeping only if training decoding on the GPU (each image costing the
    GPU its decode time as well as its step) beats training fed by CPU decoding on this machine's other cores."""
    decoders = gpu_decoders()
    if not decoders:
        with contextlib.suppress(ImportError):
            import nvidia.dali  # noqa: F401

            part.add({"what": "GPU JPEG decode", "skipped": "only DALI is importable, and its pipelines are not wired "
                      "here: install torchvision or nvImageCodec beside torch"})
            return
        part.add({"what": "GPU JPEG decode", "skipped": "no GPU JPEG decoder importable (torchvision, nvImageCodec, "
                  "DALI): install one beside torch to measure this variant"})
        return
    urls = read_manifest(prefix).shard_urls(prefix)
    jpegs = [sample["jpg"] for sample, _ in zip(_samples(urls), range(2 * part.scale.batch_sizes[-1]), strict=False)]
    cpu_fed = min(step_rate, ((os.cpu_count() or 2) - 1) * per_core)
    for name, make in decoders.items():
        part.running(f"GPU JPEG decode: {name}")
        try:
            rate = decode_on_device(make(), jpegs, part.scale.image_size, part.device)
        except Exception as error:
            part.add({"what": f"GPU JPEG decode: {name}", "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        gpu_fed = 1 / (1 / step_rate + 1 / rate)
        part.add(row(f"training fed by {name} on the {part.device.type}", gpu_fed, "img/s",
                     "training fed by CPU decoding (this machine's cores - 1)", cpu_fed,
                     note=f"decode + resize {rate:,.0f} img per device-second; keep it: "
                          f"{'yes' if gpu_fed > cpu_fed else 'no'}", decode_per_device_s=rate))


# ------------------------------------------------------------------------------------- (c) syncs, agreement


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (`.item()`, `float()`, `int()`, `nonzero`): each
    one waits for the device on CUDA. The CPU rehearsal's stand-in for torch.cuda.set_sync_debug_mode."""

    OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_syncs(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Host synchronisations per call of `step`: on CUDA the warnings of torch.cuda.set_sync_debug_mode("warn")
    (raised in this thread), on the CPU the host reads that would be one."""
    step()  # warm-up: lazy initialisation is not a per-step cost
    if device.type != "cuda":
        with HostReads() as reads:
            for _ in range(steps):
                step()
        return reads.count / steps
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def loop_step(part: Part, prefix: str, config: Config) -> Callable[[], Any]:
    """One step as the training loop takes it: the next batch to the device, the stop agreement, the step."""
    state = build_train_state(config, part.device)
    loader = ShardStream(prefix, config.data, batch_size=config.train.global_batch_size, rank=0, world_size=1,
                         train=True, num_classes=config.model.num_classes)
    batches, stops = iter(loader), StopAgreement(WorkerContext(device=part.device))

    def step() -> float:
        _, images, targets, valid = next_batch(batches, config, part.device, stops)
        stops.agree()
        return train_step(state, config, images, targets, valid).loss

    return step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_calls(call: Callable[[], Any], count: int) -> float:
    """Microseconds per call, after a tenth as many warm-up calls (which also line the ranks up)."""
    for _ in range(max(count // 10, 2)):
        call()
    start = time.perf_counter()
    for _ in range(count):
        call()
    return 1e6 * (time.perf_counter() - start) / count


def agreement_rank(rank: int, port: int, device_type: str, steps: int, out: str) -> None:
    """One of 2 ranks: the default group on the device's backend (NCCL on CUDA, both ranks on the one GPU), whose
    StopAgreement then agrees over its own gloo side group; rank 0 writes microseconds per `agree()`."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        stops = StopAgreement(WorkerContext(rank=rank, world_size=2, device=device))
        agree_us = time_calls(stops.agree, steps)
        stops.close()
        if rank == 0:
            Path(out).write_text(json.dumps({"agree_us": agree_us, "backend": backend,
                                             "side_group": stops._group is not None}))
    finally:
        dist.destroy_process_group()


def device_all_reduce_us(device: torch.device, steps: int) -> float:
    """Microseconds per all-reduce (MAX) of the flag on the device and its read back to the host, on a 1-rank
    group of the device's backend: what agreeing on the device would cost at least (launch + host sync, no wire;
    2 ranks cannot share one GPU in an NCCL communicator)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        flag = torch.zeros(1, dtype=torch.int32, device=device)

        def call() -> int:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item())

        return time_calls(call, steps)
    finally:
        dist.destroy_process_group()


def part_syncs(part: Part) -> None:
    """(c). The 2 agreement ranks are forked before this process touches CUDA (a forked child cannot use a CUDA
    context its parent made)."""
    scale = part.scale
    part.running("stop agreement, 2 ranks")
    out = part.workdir / "agreement.json"
    mp.start_processes(agreement_rank, args=(free_port(), part.device.type, scale.agree_steps, str(out)), nprocs=2,
                       start_method="fork")
    agreement = json.loads(out.read_text())
    device_us = device_all_reduce_us(part.device, scale.agree_steps)
    batch = scale.batch_sizes[0]
    config = step_config(scale, batch, loader_overrides(scale, batch))
    images, targets = synthetic_batch(config, part.device)
    steps = {"pipeline train_step": pipeline_step(config, images, targets, None)}
    step_s = time_steps(steps["pipeline train_step"], scale, batch, part.device)["step_s"]
    group = "its gloo side group" if agreement["side_group"] else "the default gloo group"
    part.add(row(f"stop agreement per step, 2 ranks on {agreement['backend']}, over {group}", agreement["agree_us"],
                 "us", f"all-reduce of the flag on the {part.device.type} + host read, 1 rank (no wire)", device_us,
                 better=None, note=f"{agreement['agree_us'] / 1e6 / step_s:.2%} of a b{batch} step "
                                   f"({1e3 * step_s:.0f} ms)"))
    method = "set_sync_debug_mode warnings" if part.device.type == "cuda" else "host reads (CPU stand-in)"
    part.running("host syncs per step")
    plain = count_syncs(plain_step(config, images, targets), scale.sync_steps, part.device)
    steps["loop step (next_batch, agree, train_step)"] = loop_step(part, ensure_shards(part), config)
    for name, step in steps.items():
        count = count_syncs(step, scale.sync_steps, part.device)
        part.add(row(f"host syncs per step, {name}, b{batch}", count, "syncs", "plain PyTorch step", plain,
                     better=None, note=method))


# ------------------------------------------------------------------------------------------------- (d) MAP


def best_seconds(call: Callable[[], float], device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """(best wall seconds, value) of `call` over `repeats` runs, the device drained around each."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        value = call()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), value


def part_map(part: Part) -> None:
    """(d): one-shot MAP@100 at FastEval14k scale and the evaluator's streaming metric at JFT scale, on the
    device against the CPU path, on the same scores."""
    one_shot_map(part)
    free_memory()
    streamed_map(part)


def one_shot_map(part: Part) -> None:
    """`map_at_k` on the whole (FastEval14k-sized) matrix: the device's time against the CPU's."""
    (n, c), device = part.scale.map_sizes[0], part.device
    part.running(f"MAP@100 one-shot {n:,} x {c:,}")
    scores, targets = make_dataset(n, c)
    cpu_s, cpu_map = best_seconds(lambda: map_at_k(scores, targets, K), torch.device("cpu"))
    start = time.perf_counter()
    on_device = scores.to(device), targets.to(device)
    copy_s = time.perf_counter() - start
    device_s, device_map = best_seconds(lambda: map_at_k(*on_device, K), device)
    part.add(row(f"MAP@100 one-shot {n:,} x {c:,} on {device.type}", device_s, "s",
                 f"CPU path, threads: {torch.get_num_threads()}", cpu_s, better="lower",
                 note=f"MAP {device_map:.6f} vs {cpu_map:.6f}; copy to the device {copy_s:.2f} s",
                 map=(device_map, cpu_map)))


def streamed_map(part: Part) -> None:
    """Batches drawn on the device, each fed to a device metric and (copied) to a CPU one; only the updates
    and the final compute are timed. Past the part's cap both stop at the same image, and the row says how far."""
    (n, c), device, batch = part.scale.map_sizes[1], part.device, part.scale.map_batch
    part.running(f"MAP@100 streamed {n:,} x {c:,}")
    seconds = {"device": 0.0, "cpu": 0.0}
    metrics = {"device": MeanAveragePrecisionAtK(c, K), "cpu": MeanAveragePrecisionAtK(c, K)}
    done = 0
    for start in range(0, n, batch):
        if part.left() < 15:
            break
        scores, targets = make_batch(start, min(batch, n - start), c, device=device)
        inputs = {"device": (scores, targets), "cpu": (scores.cpu(), targets.cpu())}
        for where, metric in metrics.items():
            seconds[where] += best_seconds(lambda m=metric, i=inputs[where]: m.update(*i), device, 1)[0]
        done += len(scores)
    values = {}
    for where, metric in metrics.items():
        took, values[where] = best_seconds(lambda m=metric: m.compute()[f"map@{K}"].item(), device, 1)
        seconds[where] += took
    part.add(row(f"MAP@100 streamed {done:,} x {c:,} on {device.type} (MeanAveragePrecisionAtK, batches of {batch:,})",
                 seconds["device"], "s", f"CPU path, threads: {torch.get_num_threads()}", seconds["cpu"],
                 better="lower", note=f"MAP {values['device']:.6f} vs {values['cpu']:.6f}"
                 + ("" if done == n else f"; stopped at {done:,} of {n:,} images by the cap"),
                 map=(values["device"], values["cpu"])))


# ----------------------------------------------------------------------------------------- (e) learning curve


def curve_config(scale: Scale, demo_location: str | None) -> Config:
    """The `multilabel` preset, as users are told to start, on the `demo` preset's dataset at the preset's 299 px."""
    raw = read_preset_or_file("multilabel")
    raw.setdefault("data", {})["demo"] = load_config("demo").data.demo.model_dump(mode="json")
    overrides = [*scale.curve, *([f"data.demo.location={demo_location}"] if demo_location else [])]
    return validate(apply_overrides(raw, overrides))


def epoch_share(config: Config) -> float:
    """The fraction of the training set an epoch trains on (each loader worker drops what fills no whole batch)."""
    manifest = read_manifest(config.data.train)
    split = Split(1, max(1, config.data.loader_workers), config.train.global_batch_size)
    plan = train_plan([shard.samples for shard in manifest.shards], split, seed=0, epoch=0)
    return plan.batches_per_rank * config.train.global_batch_size / manifest.num_samples


def part_curve(part: Part) -> None:
    """(e): MAP@100 (per class and per image) at each checkpoint against the class prior's and random scores'."""
    location = part.options.demo_location or (str(part.workdir / "demo") if part.options.dry_run else None)
    part.running("demo data")
    config = prepare_demo_data(curve_config(part.scale, location), workers=1 if part.options.dry_run else None)
    part.running(f"multilabel preset, {config.train.total_steps} steps")
    result = run_pipeline(config, part.scale.curve_eval_every, WorkerContext(device=part.device),
                          time_cap_s=part.left() - 30)  # the rest: evaluating the checkpoints
    prior, random = result["baselines"]["prior"], result["baselines"]["random"]
    steps_done = result["points"][-1]["step"] if result["points"] else 0
    part.record["details"] = {"points": result["points"], "loss": result["loss"], "wall_s": result["wall_s"],
                              "baselines": result["baselines"], "capped": result["capped"],
                              "train_images_per_s": steps_done * config.train.global_batch_size / result["wall_s"]}
    size, used = config.data.image_size, epoch_share(config)
    for point in result["points"]:
        part.add(row(f"multilabel MAP@100 per class at {size} px, step {point['step']}", 100 * point["map"], "%",
                     "class prior", 100 * prior["map@100"],
                     note=f"random {100 * random['map@100']:.2f}%; per image {100 * point['image_map']:.2f}% "
                          f"(prior {100 * prior['image_map@100']:.2f}%); {point['seconds']:.0f} s; "
                          f"{used:.0%} of the images trained on per epoch"))
    if result["capped"]:
        part.add({"what": "multilabel curve", "skipped": result["capped"]})


# ------------------------------------------------------------------------------------------------- driver


PARTS: dict[str, Callable[[Part], None]] = {"a": part_train_step, "b": part_loop, "c": part_syncs, "d": part_map,
                                            "e": part_curve}


def part_process(name: str, options: argparse.Namespace, workdir: Path, out: Path) -> None:
    """A part's process (forked: the parent never touches CUDA). Its own process group, so that the parent can
    stop it with everything it started (loader workers, ranks, compile workers)."""
    os.setpgrp()
    scale = DRY if options.dry_run else GPU
    cuda = torch.cuda.is_available() and not options.dry_run  # NVML's answer (main sets it): CUDA stays untouched
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    part = Part(name, scale, device, workdir, out, options)
    if options.dry_run:  # toy sizes gain nothing from threads, and on a busy machine their barriers cost up to 10x
        torch.set_num_threads(1)
    try:
        if cuda or options.dry_run:
            PARTS[name](part)
        else:
            part.add({"what": PART_NAMES[name], "skipped": "needs CUDA, and this machine has none (torch "
                      f"{torch.__version__}); --dry-run rehearses it at toy size on the CPU"})
    except Exception as error:
        part.add({"what": part.record["running"] or PART_NAMES[name],
                  "error": f"{type(error).__name__}: {str(error)[:300]}", "traceback": traceback.format_exc()})
        raise
    finally:
        part.record["device"] = describe(device)
        part.save()


def run_part(name: str, options: argparse.Namespace, workdir: Path) -> dict:
    """Run a part in a forked process, stopped (with all it started) at its cap; its saved rows, plus one saying
    where it stopped when it did not finish."""
    cap = (DRY if options.dry_run else GPU).caps[name]
    out = workdir / f"part-{name}.json"
    process = multiprocessing.get_context("fork").Process(target=part_process, args=(name, options, workdir, out))
    start = time.perf_counter()
    process.start()
    process.join(cap + 15)  # the part keeps its own clock; this catches what cannot look at it (a compile, a hang)
    stopped = process.is_alive()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # also whatever the part left behind
    process.join()
    record = json.loads(out.read_text()) if out.exists() else {"rows": [], "running": None}
    if stopped:
        record["rows"].append({"what": record["running"] or PART_NAMES[name],
                               "error": f"stopped at part ({name})'s {cap:.0f} s cap"})
        done = {r["what"] for r in record["rows"]}
        record["rows"] += [{"what": what, "skipped": "not reached before the part's cap"}
                           for what in record.get("planned", []) if what not in done]
    elif process.exitcode != 0 and not any("error" in r for r in record["rows"]):
        record["rows"].append({"what": PART_NAMES[name], "error": f"the part's process exited {process.exitcode}"})
    record.update(part=name, seconds=time.perf_counter() - start, cap_s=cap)
    for line in record["rows"]:
        line["part"] = name
    return record


def fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def gain(line: dict) -> str:
    """How many times better than the peer (">1x": better), where the two are alternatives."""
    figure, peer = line["figure"], line["peer_figure"]
    if line["better"] is None or not peer or not figure:
        return ""
    return f"{(figure / peer if line['better'] == 'higher' else peer / figure):.2f}x"


def table(parts: dict[str, dict]) -> str:
    header = ("part", "measurement", "figure", "peer", "peer figure", "x peer", "note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, record in parts.items():
        for r in record["rows"]:
            if "figure" not in r:
                cells = [name, r["what"], "skipped" if "skipped" in r else "FAILED", "", "", "",
                         r.get("skipped") or r.get("error", "")]
            else:
                peer = f"{fmt(r['peer_figure'])} {r['unit']}" if r["peer_figure"] is not None else "n/a"
                cells = [name, r["what"], f"{fmt(r['figure'])} {r['unit']}", r["peer"], peer, gain(r), r["note"]]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_report(path: Path, options: argparse.Namespace, parts: dict[str, dict], started: float) -> dict:
    devices = sorted({record.get("device") for record in parts.values() if record.get("device")})
    report = {"benchmark": "gpu_acceptance", "dry_run": options.dry_run, "devices": devices,
              "seconds": time.perf_counter() - started, "parts": parts, "table": table(parts),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    return report


def prepare_demo(location: str) -> None:
    """Generate part (e)'s demo data into `location` (needs the `demo` extra), to carry to a GPU machine."""
    config = prepare_demo_data(curve_config(GPU, location))
    print(f"demo data for part (e): {config.data.train} and {config.data.eval}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size on the CPU")
    parser.add_argument("--out", default=None, help="JSON path (default benchmark-results/gpu_acceptance[_dry_run]"
                        ".json)")
    parser.add_argument("--demo-location", default=None, help="data.demo.location for part (e) (default: the "
                        "preset's; a scratch folder in a dry run)")
    parser.add_argument("--prepare-demo", metavar="DIR", help="only generate part (e)'s demo data into DIR")
    options = parser.parse_args(argv)
    # torch.cuda.is_available() asks NVML instead of initialising CUDA, so the part processes forked from here (and
    # part (c)'s ranks, forked from its process) can each start CUDA themselves.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if options.prepare_demo:
        prepare_demo(options.prepare_demo)
        return 0
    out = Path(options.out or f"benchmark-results/gpu_acceptance{'_dry_run' if options.dry_run else ''}.json")
    started, parts = time.perf_counter(), {}
    workdir = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    try:
        for name in options.parts:
            print(f"part ({name}) {PART_NAMES[name]} ...", flush=True)
            parts[name] = run_part(name, options, workdir)
            write_report(out, options, parts, started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = write_report(out, options, parts, started)
    print(f"\n{'DRY RUN (toy sizes, CPU): ' if options.dry_run else ''}{', '.join(report['devices'])}; "
          f"{report['seconds']:.0f} s")
    print(report["table"])
    print(f"wrote {out}")
    failed = [r for record in parts.values() for r in record["rows"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
