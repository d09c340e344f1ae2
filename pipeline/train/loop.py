"""The per-worker training loop: build, restore, then for each step: batch, update, log, checkpoint.

It reads top to bottom like the table of contents of a run (big_vision style); each component lives in its module
and keeps its own state: the checkpointer its cadence and what goes into a checkpoint, the scalar writer its
throughput window, the sample audit its keys, the stop agreement whether every rank goes on (a preemption notice or
one rank's bad data stops all of them at the same step boundary: `pipeline.train.stopping`). The same function runs
on one process (world_size 1, no process group) and as a Ray Train DDP worker (`pipeline.train.ranks`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import torch

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.format import checkpoint_url
from pipeline.config import Config
from pipeline.data.format import Manifest, class_fingerprint, read_classes, read_manifest
from pipeline.data.loading import BadDataError, Batch, ShardStream, to_device
from pipeline.models import preprocess_input
from pipeline.train.audit import SampleAudit
from pipeline.train.init_from import initialize_from
from pipeline.train.ranks import WorkerContext, gather_ranks, write_rank_info
from pipeline.train.ray_internals import Preempted
from pipeline.train.rng import RankRng
from pipeline.train.scalars import ScalarWriter
from pipeline.train.step import build_train_state, train_step
from pipeline.train.stopping import PreemptionPoll, StopAgreement, StopReason

log = logging.getLogger(__name__)

# Ray Train's report on its workers: the latest metrics and the URL of a checkpoint committed since the last report
# (None if none), so that Ray knows every committed checkpoint (`Result.checkpoint`) without uploading it again.
Reporter = Callable[[dict, str | None], None]


def wrap_model(model: torch.nn.Module, config: Config, ctx: WorkerContext) -> torch.nn.Module:
    """DDP across ranks when there are several (the process group exists already), then torch.compile if asked."""
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.train.compile:
        model = torch.compile(model)
    return model


Inputs = tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]


def next_batch(batches: Iterator[Batch], config: Config, device: torch.device,
               stops: StopAgreement | None = None) -> Inputs | None:
    """The next batch, and its model inputs on `device`: (batch, images, targets, valid). With `stops`, a
    `BadDataError` is handed to the agreement (every rank then stops at the step boundary) and None returned."""
    try:
        with torch.random.fork_rng(devices=[]):  # loading must not draw from the model's random stream
            batch = next(batches)
    except BadDataError as error:
        if stops is None:
            raise
        stops.bad_data(error)
        return None
    pixels, targets = to_device(batch, device, config.model.num_classes, channels_last=config.train.channels_last)
    return batch, preprocess_input(pixels), targets, batch.valid.to(device, non_blocking=True)


def _train_frequency(config: Config, manifest: Manifest) -> torch.Tensor | None:
    """The training classes' frequencies (classes.tsv) when the loss weights classes by them, else None."""
    if not config.loss.class_frequency_power:
        return None
    assert config.data.train is not None
    classes = read_classes(config.data.train, manifest, config.storage)
    return torch.tensor([float(c.train_frequency) for c in classes])


def _close_after_error(*closers: Callable[[], None]) -> None:
    """Finish background work (checkpoint upload, TensorBoard upload, tracking) on the way out of a failed run,
    without masking its error: the last checkpoint gets committed and the events up to the failure get published."""
    for close in closers:
        try:
            close()
        except Exception:
            log.exception("while stopping after an error")


def train(config: Config, ctx: WorkerContext | None = None, report: Reporter | None = None,
          poll_drains: PreemptionPoll | None = None) -> dict:
    """Train until `train.total_steps`, resuming from the run's latest complete checkpoint; returns final metrics.

    On a Ray Train worker, `report` is Ray's report and `poll_drains` Ray's `get_preemption_info`."""
    ctx = ctx or WorkerContext()
    storage, device = config.storage, ctx.device
    if config.data.train is None:
        raise ValueError("data.train is not set: give the URL of a training dataset prefix (holds manifest.json)")
    manifest = read_manifest(config.data.train, storage)

    # Build.
    state = build_train_state(config, device, samples_per_epoch=manifest.num_samples,
                              train_frequency=_train_frequency(config, manifest))
    state.model = wrap_model(state.model, config, ctx)
    rng = RankRng(ctx.rank, ctx.world_size, device)
    rng.seed(config.train.seed)  # after the (identical) initialisation: dropout differs across ranks
    split = config.batch_split(ctx.world_size)  # the global batch is the same at every (elastic) world size
    loader = ShardStream(config.data.train, config.data, batch_size=split.per_rank, rank=ctx.rank,
                         world_size=ctx.world_size, train=True, storage=storage, num_classes=config.model.num_classes)
    checkpointer = Checkpointer(config.run_dir, config, storage, rank=ctx.rank, device=ctx.device,
                                gather=functools.partial(gather_ranks, ctx=ctx), train_state=state, loader=loader,
                                rng=rng)
    # What the class ids mean, recorded in every COMMIT; the evaluator refuses eval data with other classes.
    classes = class_fingerprint(config.data.train, manifest, storage) if ctx.rank == 0 else None
    audit = SampleAudit(config, ctx, write_at=checkpointer.is_checkpoint_step)

    # Restore.
    resumed = checkpointer.restore()
    if resumed is not None:
        log.info("rank %d resumed from %s (step %d, %d samples seen)", ctx.rank, resumed.url, state.step,
                 state.samples_seen)
    else:  # a new run: start from model.init_from's weights, if given (a resumed run never re-initialises)
        initialize_from(state, config, write_summary=ctx.rank == 0)
    start_step = state.step
    write_rank_info(config, ctx, start_step)
    audit.forget_after(start_step)  # what an attempt that did not reach its next checkpoint wrote

    # Train.
    batches = iter(loader)
    # Opened last, just before the `try` that closes it on every way out: its staging directory and tracked run
    # outlive a failed restore or init_from otherwise.
    scalars = ScalarWriter(config.run_dir, config, enabled=ctx.rank == 0, report=report, ctx=ctx)
    stops = StopAgreement(ctx, poll_drains, poll_interval_s=config.cluster.preemption_poll_s,
                          poll_budget=config.cluster.preemption_poll_budget)
    try:
        while state.step < config.train.total_steps:
            with scalars.waiting_for_data():
                inputs = next_batch(batches, config, device, stops)
            # Every rank learns of any rank's bad data (raised here) or preemption notice; a notice takes effect
            # after this step, whose batch is in hand: its checkpoint is then the last completed step.
            preempted = stops.agree() is StopReason.PREEMPTED
            batch, images, targets, valid = inputs
            result = train_step(state, config, images, targets, valid,
                                global_batch_size=config.train.global_batch_size)
            scalars.log(state, result, loader)
            audit.record(state.step, batch, write=preempted)  # written before the step's checkpoint commits
            last = preempted or state.step == config.train.total_steps
            if preempted and ctx.rank == 0:
                log.warning("preemption notice (%s): checkpointing step %d, then every rank stops", stops.notice,
                            state.step)
            extra = {"metrics": scalars.last, "class_fingerprint": classes,
                     "stopped": "preempted" if preempted else None}
            if checkpointer.maybe_save(state.step, extra=extra, now=preempted):
                if last:
                    checkpointer.wait()  # committed, so that the report below hands it to Ray
                # Ray Train's report is a barrier: only as often as checkpoints.
                scalars.publish(state.step, checkpointer.take_unreported())
            if preempted and state.step < config.train.total_steps:
                checkpointer.wait()  # rank 0: committed
                stops.commit_barrier()  # no rank leaves before the commit exists: Ray ends the group at once
                raise stops.preempted(state.step, checkpoint_url(config.run_dir, state.step))
    except BaseException as error:
        failed = not isinstance(error, Preempted)  # a preempted run goes on after the restart
        _close_after_error(checkpointer.wait, lambda: scalars.close(failed=failed))
        raise
    finally:
        stops.close()
    checkpointer.wait()
    scalars.close()
    final = scalars.last or {"step": state.step, "samples_seen": state.samples_seen}
    log.info("rank %d finished at step %d (started at %d)", ctx.rank, state.step, start_step)
    return final
