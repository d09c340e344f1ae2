"""Launch DDP training on a Ray cluster with Ray Train: one rank per worker, restarts from the last checkpoint.

`launch()` checks everything it can on the submitting machine first (config, manifest, class count, shards vs
ranks x loader workers), then builds a `TorchTrainer`: `ScalingConfig` from `cluster.*`, gloo on CPUs or NCCL on
GPUs (Ray Train sets up the process group and `ray.train.torch.get_device()`), `FailureConfig(max_failures,
max_preemption_failures)` so a lost worker or node restarts the whole group, which then resumes from the run's latest
complete checkpoint. Ray Train's run directory is the run's own (`RunConfig(storage_path=run.storage,
name=run.name)`), so every committed checkpoint is reported to Ray where it lies, without a second upload:
`Result.checkpoint` and `ray.train.get_checkpoint()` name it. The `COMMIT` rule (`pipeline.checkpoint.format`)
stays the one truth: a restart resumes from the newest checkpoint with a COMMIT, and says so if Ray's differs.

Faults, and how each ends:
- A preemption notice (a Ray node drain, seen through `ray.train.get_preemption_info()`, or SIGTERM to a worker)
  checkpoints the last completed step and restarts the group from it, counted against `cluster.max_preemptions`
  (`pipeline.train.stopping`; the Ray hooks it needs are in `pipeline.train.ray_internals`).
- A stalled worker (frozen, or its node unreachable) stops answering Ray Train's health check; after
  `cluster.stall_timeout_s` the controller declares it dead and restarts the group. The torch process group's own
  timeout (`cluster.collective_timeout_s`) catches a worker that is alive but stuck in a collective.
- A deterministic stop (`NonFiniteError`, `BadDataError`) is recorded in `<run>/FAILED.json` by rank 0 while every
  rank returns normally, so Ray Train does not retry it; `launch()` raises it again (`pipeline.train.faults`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pipeline.checkpoint.format import latest_checkpoint, read_commit
from pipeline.cluster import connect_ray
from pipeline.config import Config, validate
from pipeline.data.format import check_same_classes, class_fingerprint, read_manifest
from pipeline.models import build_model
from pipeline.models.weights import absolute_init_source, check_init_source
from pipeline.storage import absolute_url, is_local_url, local_path, s3_endpoint, s3_region
from pipeline.tracking import require_backend
from pipeline.train.elastic import check_world_sizes, describe_workers, scaling_arguments
from pipeline.train.faults import (
    accepting_notices,
    clear_failure,
    deterministic_stops,
    raise_recorded_failure,
    record_failure,
)
from pipeline.train.loop import train
from pipeline.train.ranks import WorkerContext
from pipeline.train.ray_internals import Preempted, peer_lost

log = logging.getLogger(__name__)


def preflight(config: Config) -> None:
    """Refuse a launch that cannot work, before any cluster resource is requested."""
    if config.data.train is None:
        raise ValueError("data.train is not set: give the URL of a training dataset prefix (holds manifest.json)")
    manifest = read_manifest(config.data.train, config.storage)
    if manifest.num_classes != config.model.num_classes:
        raise ValueError(f"model.num_classes={config.model.num_classes} but the training data at {config.data.train} "
                         f"has {manifest.num_classes} classes; set model.num_classes={manifest.num_classes}")
    check_world_sizes(config, manifest)  # shards and batch at every size an elastic range allows
    if config.model.init_from and latest_checkpoint(config.run_dir, config.storage) is None:
        # A resumed run does not read it. Every tensor it would load is compared with the model's own, built on the
        # meta device (shapes only, no memory).
        with torch.device("meta"):
            fits = build_model(config).state_dict()
        check_init_source(config.model.init_from, config.storage, fits=fits, weights=config.model.init_weights)
    require_backend(config.tracking)  # the tracking package, here rather than on the workers
    trained = class_fingerprint(config.data.train, manifest, config.storage)  # rank 0 reads it too (every COMMIT)
    if config.data.eval is not None:  # now, not when the evaluator meets it hours into the run
        check_same_classes(trained, config.data.eval, config.storage)


def train_worker(raw_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: rank and device from Ray Train's context, then the loop.

    A deterministic stop is recorded, not raised: Ray Train would retry it (see `pipeline.train.faults`). A
    preemption stop, and a collective that lost its peer (another rank died), are raised in one line: Ray restarts
    the group from the latest checkpoint.
    """
    import ray.train
    import ray.train.torch

    from pipeline.train.ray_internals import quiet_ray_train_logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_ray_train_logs()
    context = ray.train.get_context()
    ctx = WorkerContext(rank=context.get_world_rank(), world_size=context.get_world_size(),
                        local_rank=context.get_local_rank(), node_rank=context.get_node_rank(),
                        device=ray.train.torch.get_device())
    config = validate(raw_config)
    if ctx.rank == 0:
        _compare_with_rays_checkpoint(config, ray.train.get_checkpoint())
    try:
        with accepting_notices():  # from the start: a notice during the restart of a group is one too
            train(config, ctx, report=_ray_reporter(config), poll_drains=ray.train.get_preemption_info)
    except deterministic_stops() as error:  # every rank stops at the same step; none may raise, or Ray retries
        log.error("rank %d: %s", ctx.rank, error)
        if ctx.rank == 0:
            record_failure(config.run_dir, error, config.storage)
    except Preempted as error:
        log.warning("rank %d: %s", ctx.rank, error)
        raise error.with_traceback(None) from None  # what Ray logs is this frame only
    except RuntimeError as error:
        lost = peer_lost(error)
        if lost is None:
            raise
        log.warning("rank %d: %s", ctx.rank, lost)
        raise lost from None


def _ray_reporter(config: Config) -> Any:
    """Ray Train's report, handing it each committed checkpoint where it lies (no upload: it is in Ray's run
    directory, which is ours)."""
    import ray.train

    storage = _ray_storage(config)

    def report(metrics: dict, checkpoint_url: str | None) -> None:
        checkpoint = None
        if checkpoint_url is not None:
            inside_run = checkpoint_url.removeprefix(config.run_dir).lstrip("/")  # checkpoints/step-NNNNNNNNN
            path = f"{storage['storage_path']}/{config.run.name}/{inside_run}"
            checkpoint = ray.train.Checkpoint(path=path, filesystem=storage.get("storage_filesystem"))
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    return report


def _compare_with_rays_checkpoint(config: Config, reported: Any) -> None:
    """Log when Ray's latest reported checkpoint is not the run's newest committed one (the COMMIT rule wins: a
    checkpoint committed after Ray's last report, or one Ray reported that retention has removed since)."""
    ours = latest_checkpoint(config.run_dir, config.storage)
    theirs = None if reported is None else reported.path.rstrip("/").rsplit("/", 1)[-1]
    ours_name = None if ours is None else ours.url.rsplit("/", 1)[-1]
    if theirs != ours_name:
        log.info("Ray Train's latest reported checkpoint is %s; the run resumes from %s, the newest with a COMMIT",
                 theirs, ours_name)


def _ray_storage(config: Config) -> dict[str, Any]:
    """Ray Train's run storage (`RunConfig.storage_path`): `run.storage`, so that Ray's run directory
    (<storage_path>/<run.name>) is the run directory and its checkpoints are Ray's without a copy."""
    storage = config.run.storage
    if storage.startswith("s3://"):
        import pyarrow.fs

        # The same endpoint and region as the pipeline's own clients (pipeline.storage), so Ray's files and ours
        # land in one store; pyarrow needs a region where botocore would fall back to its default.
        kwargs: dict[str, Any] = {"region": s3_region(config.storage) or "us-east-1"}
        endpoint = s3_endpoint(config.storage)
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        return {"storage_path": storage.removeprefix("s3://").rstrip("/"),
                "storage_filesystem": pyarrow.fs.S3FileSystem(**kwargs)}
    if not is_local_url(storage):
        return {"storage_path": storage.rstrip("/")}
    return {"storage_path": os.path.abspath(local_path(storage))}


def prepare(config: Config) -> Config:
    """The config to launch: the demo dataset generated and filled in when `data.demo` stands in for `data.train`,
    local paths made absolute (Ray workers have their own working directories; a multi-node run needs object
    storage or a shared filesystem), then every pre-launch check (`preflight`)."""
    if config.data.train is None and config.data.demo is not None:
        from pipeline.data.demo import prepare_demo_data

        config = prepare_demo_data(config)
    raw = config.model_dump(mode="json")
    raw["run"]["storage"] = absolute_url(config.run.storage)
    for split in ("train", "eval"):
        if raw["data"][split] is not None:
            raw["data"][split] = absolute_url(raw["data"][split])
    if config.model.init_from:
        raw["model"]["init_from"] = absolute_init_source(config.model.init_from)
    config = validate(raw)
    preflight(config)
    return config


def launch(config: Config) -> dict[str, Any]:
    """Run training on the Ray cluster at `cluster.address` (or RAY_ADDRESS, or a new local one).

    Returns the final metrics of rank 0; raises the recorded deterministic stop (`NonFiniteError` naming the step,
    `BadDataError` naming the shards), without Ray retries. `config` must come from `prepare` (absolute paths,
    checks done).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.ray_internals import preemptible_torch_config, set_controller_environment

    connect_ray(config)  # forwards FORWARDED_ENV, also when the background evaluator connected first
    cluster = config.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    clear_failure(config.run_dir, config.storage)  # a record from an earlier launch is stale now
    set_controller_environment(cluster.stall_timeout_s, cluster.preemption_poll_s)  # Ray forwards them
    failures = FailureConfig(max_failures=cluster.max_failures, max_preemption_failures=cluster.max_preemptions)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.model_dump(mode="json"),
        torch_config=preemptible_torch_config(cluster.use_gpu, cluster.collective_timeout_s),
        scaling_config=ScalingConfig(**scaling_arguments(config), use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources),
        # Ray keeps every reported checkpoint on record and deletes none: retention is checkpoint.keep_*'s.
        run_config=RunConfig(name=config.run.name, failure_config=failures,
                             checkpoint_config=CheckpointConfig(num_to_keep=None), **_ray_storage(config)),
    )
    log.info("training %s on %s -> %s", config.run.name, describe_workers(config), config.run_dir)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    raise_recorded_failure(config.run_dir, config.storage)
    return final_metrics(config, result.checkpoint)


def final_metrics(config: Config, ray_checkpoint: Any = None) -> dict[str, Any]:
    """The last metrics record of a run, as committed with its latest checkpoint, and the checkpoint Ray Train
    reported last (`ray_checkpoint`: the path in Ray's filesystem, None when Ray has none)."""
    ref = latest_checkpoint(config.run_dir, config.storage)
    if ref is None:
        return {}
    commit = read_commit(ref.url, config.storage)
    return {"step": commit["step"], "samples_seen": commit["samples_seen"], **(commit.get("metrics") or {}),
            "checkpoint": ref.url, "ray_checkpoint": None if ray_checkpoint is None else ray_checkpoint.path}
