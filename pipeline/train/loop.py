"""The per-worker training loop: build, restore, then for each step: batch, update, log, checkpoint.

It reads top to bottom like the table of contents of a run (big_vision style); helpers live in their modules.
The same function runs on one process (world_size 1, no process group) and as a Ray Train DDP worker, where
`pipeline.train.launcher` has already set up the process group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.data import ShardStream, read_manifest, to_device
from pipeline.data.manifest import class_fingerprint
from pipeline.models import preprocess_input
from pipeline.storage import StorageError, join_url, write_bytes
from pipeline.storage.checkpoints import is_checkpoint_step
from pipeline.train.checkpoint import Checkpointer, load_checkpoint
from pipeline.train.metrics import MetricsWriter
from pipeline.train.rng import rng_state, seed_rank, set_rng_state
from pipeline.train.step import build_train_state, train_step

log = logging.getLogger(__name__)

Reporter = Callable[[dict], None]


@dataclass(frozen=True)
class WorkerContext:
    """Where this process sits in the job; from Ray Train's context, or (0, 1, 0, 0) for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _write_rank_info(config: Config, ctx: WorkerContext, start_step: int) -> None:
    """Where each rank runs (node, host, pid): for operators reading a run directory, and for the tests."""
    import os
    import socket

    info = {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank, "node_rank": ctx.node_rank,
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(ctx.device), "start_step": start_step,
            "time": time.time()}
    try:
        import ray

        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    name = f"rank-{ctx.rank:05d}.json"
    write_bytes(join_url(config.run_dir, "workers", name), json.dumps(info).encode(), config.storage)


def wrap_model(model: torch.nn.Module, config: Config, ctx: WorkerContext) -> torch.nn.Module:
    """DDP across ranks when there are several (the process group exists already), then torch.compile if asked."""
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.train.compile:
        model = torch.compile(model)
    return model


def gather_ranks(value: Any, ctx: WorkerContext) -> list:
    """Every rank's `value` (picklable), in rank order (collective: all ranks must call it)."""
    if ctx.world_size == 1:
        return [value]
    values: list = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def _close_after_error(*closers: Callable[[], None]) -> None:
    """Finish background work (checkpoint upload, TensorBoard upload) on the way out of a failed run, without
    masking its error: the last checkpoint gets committed and the events up to the failure get published."""
    for close in closers:
        try:
            close()
        except Exception:
            log.exception("while stopping after an error")


def train(config: Config, ctx: WorkerContext | None = None, report: Reporter | None = None) -> dict:
    """Train until `train.total_steps`, resuming from the run's latest complete checkpoint; returns final metrics."""
    ctx = ctx or WorkerContext()
    storage, device = config.storage, ctx.device
    if config.data.train is None:
        raise ValueError("data.train is not set: give the URL of a training dataset prefix (holds manifest.json)")
    manifest = read_manifest(config.data.train, storage)
    num_classes = config.model.num_classes

    # Build.
    state = build_train_state(config, device, samples_per_epoch=manifest.num_samples)
    state.model = wrap_model(state.model, config, ctx)
    seed_rank(config.train.seed, ctx.rank)  # after the (identical) initialisation: dropout differs across ranks
    loader = ShardStream(config.data.train, config.data, batch_size=config.per_worker_batch_size, rank=ctx.rank,
                         world_size=ctx.world_size, train=True, storage=storage, num_classes=num_classes)
    checkpointer = Checkpointer(config.run_dir, config, storage)
    # What the class ids mean, recorded in every COMMIT; the evaluator refuses eval data with other classes.
    classes = class_fingerprint(config.data.train, manifest, storage) if ctx.rank == 0 else None
    metrics = MetricsWriter(config.run_dir, config, enabled=ctx.rank == 0, report=report)

    # Restore.
    latest = checkpointer.latest()
    if latest is not None:
        restored = load_checkpoint(latest, storage, map_location=device)
        state.load_state_dict(restored["state"])
        if restored["loader"] is not None:
            loader.load_state_dict(restored["loader"])
        rngs = restored["state"].get("rng")
        if rngs is not None and len(rngs) == ctx.world_size:
            set_rng_state(rngs[ctx.rank], device)
        log.info("rank %d resumed from %s (step %d, %d samples seen)", ctx.rank, latest.url, state.step,
                 state.samples_seen)
    start_step = state.step
    _write_rank_info(config, ctx, start_step)

    # Train.
    trained_keys: list[str] = []  # since the last checkpoint, for train.log_samples
    wait_s = 0.0
    fetch_start = window_start = time.perf_counter()
    window_steps = window_ignored = 0
    batches = iter(loader)
    try:
        while state.step < config.train.total_steps:
            with torch.random.fork_rng(devices=[]):  # loading must not draw from the model's random stream
                batch = next(batches)
            pixels, targets = to_device(batch, device, num_classes, channels_last=config.train.channels_last)
            images = preprocess_input(pixels)
            valid = batch.valid.to(device, non_blocking=True)
            wait_s += time.perf_counter() - fetch_start
            result = train_step(state, config, images, targets, valid,
                                global_batch_size=config.train.global_batch_size)
            if config.train.log_samples:
                trained_keys += [key for key, ok in zip(batch.keys, batch.valid.tolist(), strict=True) if ok]
            window_steps += 1
            window_ignored += result.ignored
            if state.step % config.train.log_every == 0 or state.step == config.train.total_steps:
                # The window runs from the previous logging step to this one, so the time spent writing records
                # and checkpoints counts against the throughput it reports.
                now = time.perf_counter()
                elapsed = now - window_start
                record = {
                    "step": state.step, "samples_seen": state.samples_seen, "loss": result.loss, "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "samples_per_s": window_steps * config.train.global_batch_size / elapsed,
                    "samples_per_s_per_worker": window_steps * config.per_worker_batch_size / elapsed,
                    "data_wait_fraction": wait_s / elapsed, "skipped_nonfinite": state.skipped_nonfinite,
                    "ignored_images": window_ignored,  # this rank's since the last record: padding (+ unlabeled)
                    **{f"data/{k}": v for k, v in loader.metrics().items()},
                }
                window_start, window_steps, window_ignored, wait_s = now, 0, 0, 0.0
                metrics.write(record)
            if is_checkpoint_step(state.step, config.checkpoint.every_steps, config.train.total_steps):
                metrics.report()  # to Ray Train: a barrier across ranks, so only as often as checkpoints
                ranks = gather_ranks((loader.state_dict(), rng_state(device)), ctx)
                if config.train.log_samples:
                    # Written before the checkpoint commits: a step's keys are on record whenever its checkpoint is.
                    name = f"rank-{ctx.rank:05d}-step-{state.step:09d}.json"
                    write_bytes(join_url(config.run_dir, "samples", name), json.dumps(trained_keys).encode(),
                                storage)
                    trained_keys = []
                    if ctx.world_size > 1:
                        dist.barrier()
                if ctx.rank == 0:
                    checkpointer.save(state.step, {**state.state_dict(), "rng": [rng for _, rng in ranks]},
                                      {"ranks": [loader_state for loader_state, _ in ranks]},
                                      extra={"metrics": metrics.last, "class_fingerprint": classes})
                    try:  # TensorBoard on object storage: visible during the run; never worth a lost checkpoint
                        metrics.flush()
                    except StorageError as exc:
                        log.warning("TensorBoard upload failed at step %d (kept locally, retried at the next "
                                    "checkpoint): %s", state.step, exc)
            fetch_start = time.perf_counter()
    except BaseException:
        _close_after_error(checkpointer.wait, metrics.close)
        raise
    checkpointer.wait()
    metrics.close()
    final = metrics.last or {"step": state.step, "samples_seen": state.samples_seen}
    log.info("rank %d finished at step %d (started at %d)", ctx.rank, state.step, start_step)
    return final
