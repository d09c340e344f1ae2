"""Distributed training: DDP correctness (torch gloo), and Ray Train on a 2-node cluster with a killed worker.

Ray tests are few and purposeful (each costs tens of seconds): the session's one Ray cluster (conftest.py's
`ray_cluster`, shared with test_elastic.py) serves them all.
"""

import contextlib
import json
import os
import signal
import subprocess
import tarfile
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from paced_training import paced_runs

from pipeline.checkpoint.format import committed_checkpoints, latest_checkpoint, read_checkpoint, read_commit
from pipeline.config import load_config
from pipeline.data.format import read_manifest
from pipeline.storage import join_url, list_dir, open_read, read_bytes
from pipeline.train.loop import wrap_model
from pipeline.train.ranks import WorkerContext
from pipeline.train.step import NonFiniteError, build_train_state, train_step

pytestmark = pytest.mark.slow  # multi-node Ray clusters

TINY = ["model.width_multiplier=0.125", "model.middle_blocks=1", "model.num_classes=10", "data.image_size=71",
        "train.precision=fp32", "train.channels_last=false",  # the equivalence is exact in fp32
        "optimizer.lr=0.01", "train.ema_decay=0.9"]


def _batch(step: int, size: int = 8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.rand(size, 3, 71, 71, generator=g) * 2 - 1, (torch.rand(size, 10, generator=g) < 0.3).float()


def _ddp_rank(rank: int, world: int, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = load_config("demo", [*TINY, f"train.global_batch_size={4 * world}", f"cluster.num_workers={world}"])
    state = build_train_state(config)
    state.model = wrap_model(state.model, config, WorkerContext(rank=rank, world_size=world))
    for step in range(steps):
        images, targets = _batch(step)
        train_step(state, config, images[rank * 4:(rank + 1) * 4], targets[rank * 4:(rank + 1) * 4])
    if rank == 0:
        torch.save(state.model.module.state_dict(), out)
    # A NaN in rank 1's half only: the all-reduced gradient norm is NaN on both ranks, so both decide alike (skip,
    # then stop) and neither is left waiting in a collective.
    images, targets = _batch(steps)
    images[5, 0, 0, 0] = float("nan")
    mine = images[rank * 4:(rank + 1) * 4], targets[rank * 4:(rank + 1) * 4]
    skip = load_config("demo", [*TINY, f"train.global_batch_size={4 * world}", f"cluster.num_workers={world}",
                                "train.nonfinite=skip"])
    outcome = {"skipped": train_step(state, skip, *mine).skipped}
    outcome["finite_buffers"] = all(bool(b.isfinite().all()) for b in state.model.module.buffers())
    try:
        train_step(state, config, *mine)
    except NonFiniteError as error:
        outcome["raised_at"] = error.step
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


def test_ddp_two_workers_equal_one_worker_with_twice_the_batch(tmp_path):
    """2 ranks x batch 4 == 1 rank x batch 8 in two micro-batches of 4 (BN statistics are per 4 images in both)."""
    steps = 3
    out = str(tmp_path / "ddp.pt")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_rank, args=(2, port, steps, out), nprocs=2, join=True)
    config = load_config("demo", [*TINY, "train.global_batch_size=8", "train.micro_batches=2"])
    single = build_train_state(config)
    for step in range(steps):
        train_step(single, config, *_batch(step))
    ddp = torch.load(out, weights_only=True)
    reference = single.model.state_dict()
    moved = 0
    for name, value in reference.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
            moved += 1
    assert moved > 10
    # Control: without micro-batching the single worker's BN sees 8 images at once, and the result differs.
    plain_config = load_config("demo", [*TINY, "train.global_batch_size=8"])
    plain = build_train_state(plain_config)
    for step in range(steps):
        train_step(plain, plain_config, *_batch(step))
    name = "entry_flow.conv1.weight"
    assert not torch.allclose(plain.model.state_dict()[name], reference[name], rtol=1e-4, atol=1e-5)
    # NaN on one rank: every rank skipped the same step (BN statistics restored), then every rank stopped.
    outcomes = [json.loads((tmp_path / f"ddp.pt.rank{rank}.json").read_text()) for rank in range(2)]
    assert outcomes == [{"skipped": True, "finite_buffers": True, "raised_at": steps + 2}] * 2


# ----------------------------------------------------------------------------------------------- Ray Train


@pytest.fixture
def two_node_cluster(ray_cluster):
    """The session's shared Ray cluster (conftest.py): two 1-CPU worker nodes beside a head without CPUs."""
    return ray_cluster


def _shard_of_key(demo_train: str) -> dict[str, int]:
    owner = {}
    for index, url in enumerate(read_manifest(demo_train).shard_urls(demo_train)):
        with open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                owner[member.name.split(".", 1)[0]] = index
    return owner


def _ray_config(demo, run_storage, name, *extra):
    return load_config("demo", [
        "model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71", "data.loader_workers=1",
        "data.shuffle_buffer=32", f"data.train={demo.train}", f"data.eval={demo.eval}",
        f"model.num_classes={demo.num_classes}", "train.global_batch_size=8", "cluster.num_workers=2",
        "cluster.cpus_per_worker=1", "optimizer.lr=0.005", "train.log_every=2", "train.log_samples=true",
        f"run.storage={run_storage}", f"run.name={name}", *extra])


def _read_samples(run_dir: str) -> dict[int, list[str]]:
    by_rank: dict[int, list[str]] = {}
    for url in list_dir(join_url(run_dir, "samples")):
        rank = int(url.rsplit("/", 1)[-1].split("-")[1])
        by_rank.setdefault(rank, []).extend(json.loads(read_bytes(url)))
    return by_rank


def _workers(run_dir: str) -> list[dict]:
    return [json.loads(read_bytes(url)) for url in list_dir(join_url(run_dir, "workers"))]


def _wait_for_checkpoint(config, step: int, not_from: set[int] = frozenset()) -> None:
    """Until a checkpoint at `step` or later exists and no worker of pid `not_from` (an earlier group) is on record."""
    deadline = time.time() + 240
    while time.time() < deadline:
        ref = latest_checkpoint(config.run_dir)
        if ref is not None and ref.step >= step and not not_from & {w["pid"] for w in _workers(config.run_dir)}:
            return
        time.sleep(0.5)
    pytest.fail(f"no checkpoint at step {step} or later appeared")


def _groups(run_dir: str) -> list[str]:
    return list_dir(join_url(run_dir, "worker_groups"))


def _interrupt_workers_mid_run(config, gate, interrupts, frozen: bool = False) -> tuple[list[dict], list[float], dict]:
    """Launch, paced by `gate` (tests/paced_training.py); for each `(after_step, victim_rank, interrupt)` in turn,
    allow the run `after_step` steps, and once it has checkpointed there (in a worker group started after the
    previous interrupt) and waits, call `interrupt(victim)` with the worker record of `victim_rank` (None: the first
    rank not on this driver's node); then let it on one step at a time (a rank acts on a notice at its next step)
    until a new worker group starts. Then check that the run finished, each time on a new worker group, with every
    step's samples once. Returns the victims' records (pid, node), when each was interrupted, and what `launch`
    returned."""
    import ray

    from pipeline.train.launcher import launch

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=launch(config)), daemon=True)
    thread.start()
    victims, times = [], []
    try:
        for index, (after_step, victim_rank, interrupt) in enumerate(interrupts):
            gate.allow(after_step)
            _wait_for_checkpoint(config, after_step, not_from={v["pid"] for v in victims})
            workers = sorted(_workers(config.run_dir), key=lambda w: w["rank"])
            if victim_rank is None:
                victims.append(next(w for w in workers if w["node_id"] != ray.get_runtime_context().get_node_id()))
            else:
                victims.append(workers[victim_rank])
            started = len(_groups(config.run_dir))
            times.append(time.time())
            interrupt(victims[-1])
            until = interrupts[index + 1][0] if index + 1 < len(interrupts) else config.train.total_steps
            deadline = time.time() + 240
            while len(_groups(config.run_dir)) == started and thread.is_alive() and time.time() < deadline:
                gate.allow(min(gate.steps + 1, until))
                time.sleep(0.5)
        gate.allow(config.train.total_steps)
        thread.join(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a frozen one is never woken; ended by its own pid
            if frozen:
                os.kill(victims[-1]["pid"], signal.SIGKILL)
    result = outcome.get("result", {})
    assert result.get("step") == config.train.total_steps, f"the run did not finish after {interrupts!r}"
    assert not {v["pid"] for v in victims} & {w["pid"] for w in _workers(config.run_dir)}, "no new worker group"
    samples = _read_samples(config.run_dir)
    keys = samples[0] + samples[1]
    assert len(keys) == config.train.total_steps * 8 and len(set(keys)) == len(keys), \
        "every step's samples exactly once in the epoch"
    return victims, times, result


def _signal(sig: signal.Signals):
    return lambda worker: os.kill(worker["pid"], sig)  # a Ray Train worker process this test's cluster started


def test_a_killed_then_a_frozen_worker_each_restart_the_group_from_the_last_checkpoint(two_node_cluster,
                                                                                       tiny_demo_s3, s3_prefix,
                                                                                       monkeypatch, tmp_path):
    """Two failures in one run (cluster.max_failures=2), each on a new worker group, each at a checkpointed step:
    - kill -9 of a worker: its peer's collective fails, and the group restarts from the last checkpoint;
    - SIGSTOP of a worker: its peer blocks in the gradient all-reduce; Ray Train's health check (bounded by
      cluster.stall_timeout_s instead of Ray's 600 s) declares it dead and the group restarts from the checkpoint.
    The loader keeps its promise across both: every step's samples exactly once."""
    from pipeline.train.launcher import prepare

    config = prepare(_ray_config(tiny_demo_s3, s3_prefix, "fault", "train.total_steps=9", "checkpoint.every_steps=3",
                                 "checkpoint.background=false", "cluster.max_failures=2", "cluster.stall_timeout_s=10"))
    gate = paced_runs(monkeypatch, tmp_path, steps=3)
    _, (_, frozen_at), _ = _interrupt_workers_mid_run(
        config, gate, [(3, 1, _signal(signal.SIGKILL)), (6, 1, _signal(signal.SIGSTOP))], frozen=True)
    groups = [json.loads(read_bytes(url))["start_step"] for url in _groups(config.run_dir)]
    assert groups == [0, 3, 6], "each restart resumes from the latest checkpoint"
    replaced_after = min(w["time"] for w in _workers(config.run_dir)) - frozen_at
    print(f"frozen worker replaced {replaced_after:.0f} s after SIGSTOP (stall_timeout_s=10; Ray's default 600)")


def _check_preempted_and_resumed(config, noticed_at: list[float], result: dict, how: list[str]) -> None:
    """One preemption checkpoint per notice; each new group started exactly there (0 steps redone); Ray's last
    reported checkpoint is the final committed one; prints notice-to-commit and notice-to-next-step times."""
    preempted = [ref for ref in committed_checkpoints(config.run_dir)
                 if read_commit(ref.url).get("stopped") == "preempted"]
    assert len(preempted) == len(noticed_at), "one preemption checkpoint per notice, where the ranks stopped"
    groups = [json.loads(read_bytes(url)) for url in _groups(config.run_dir)]
    assert [g["start_step"] for g in groups] == [0, *(ref.step for ref in preempted)], \
        "each restart resumes where the ranks stopped"
    assert result["ray_checkpoint"].endswith(f"/{config.run.name}/checkpoints/step-{config.train.total_steps:09d}"), \
        "Result.checkpoint is the last committed checkpoint"
    for ref, sent, group, what in zip(preempted, noticed_at, groups[1:], how, strict=True):
        committed = read_commit(ref.url)["time"] - sent
        print(f"{what}: step {ref.step} committed {committed:.1f} s after the notice; the new group's first step "
              f"{group['time'] - sent:.1f} s after it")


def test_preemption_notices_by_sigterm_to_either_rank_and_by_a_node_drain_checkpoint_and_redo_no_step(
        two_node_cluster, tiny_demo_s3, s3_prefix, monkeypatch, tmp_path):
    """Three preemption notices in one run, each to a new worker group, none costing a failure (max_failures=0):
    - SIGTERM to the rank that does not write checkpoints, then to the one that does;
    - a spot reclaim as the autoscaler or KubeRay's preStop hook announces it: a Ray node drain with a deadline
      (`ray drain-node`); the ranks learn of it through ray.train.get_preemption_info(), and Ray restarts the group
      on nodes that are not draining. Then the node goes.
    Each time the run checkpoints where it is, no rank leaves before the commit, and the restart starts there.
    It is also the module's plain two-node run (one run's start costs more than its steps): it streams from S3,
    each rank on its own node with its own seed and its own shards, and reports its losses to TensorBoard."""
    from pipeline.train.launcher import prepare

    spare = two_node_cluster.add_node(num_cpus=1)  # the capacity the group moves to from the drained node
    two_node_cluster.wait_for_nodes()
    # The drain is noticed within about half a second: Ray's watcher and the ranks both poll every 0.2 s, whatever
    # a poll costs (the paced run waits between steps meanwhile).
    config = prepare(_ray_config(tiny_demo_s3, s3_prefix, "preempted", "train.total_steps=20",
                                 "checkpoint.every_steps=4", "checkpoint.keep_last=20", "cluster.max_failures=0",
                                 "cluster.preemption_poll_s=0.2", "cluster.preemption_poll_budget=1.0"))
    gate = paced_runs(monkeypatch, tmp_path, steps=4)
    sigterm = _signal(signal.SIGTERM)

    def drain(worker: dict) -> None:
        subprocess.run(["ray", "drain-node", "--address", two_node_cluster.address, "--node-id", worker["node_id"],
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", "120"], check=True, capture_output=True)

    (*_, drained), sent, result = _interrupt_workers_mid_run(config, gate,
                                                            [(4, 1, sigterm), (8, 0, sigterm), (12, None, drain)])
    _check_preempted_and_resumed(config, sent, result, ["SIGTERM to rank 1", "SIGTERM to rank 0", "Ray drain"])
    assert drained["node_id"] not in {w["node_id"] for w in _workers(config.run_dir)}, "moved off the draining node"
    gone = next(node for node in [*two_node_cluster.worker_nodes, spare] if node.node_id == drained["node_id"])
    two_node_cluster.remove_node(gone)  # the reclaim itself; the module's other tests keep two nodes
    _check_two_ranks_on_two_nodes(config, result, tiny_demo_s3, tmp_path)


def _check_two_ranks_on_two_nodes(config, result: dict, demo, tmp_path) -> None:
    """What any finished two-node run shows: every step's 8 samples, two ranks on two nodes seeded apart, the
    TensorBoard scalars of every worker group uploaded (each logged step's loss once, the last the final loss), and
    each rank's samples from shards of its own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = config.train.total_steps
    assert result["step"] == steps and result["samples_seen"] == steps * 8
    rngs = read_checkpoint(latest_checkpoint(config.run_dir).url)["state"]["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"]), "each rank seeds seed + rank"
    workers = _workers(config.run_dir)
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, "the two ranks must run on different nodes"
    events = tmp_path / "tensorboard"
    events.mkdir()
    for url in list_dir(join_url(config.run_dir, "tensorboard")):
        (events / url.rsplit("/", 1)[-1]).write_bytes(read_bytes(url))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    scalars = accumulator.Scalars("loss")  # whether it learns is tests/test_learning.py's: 20 steps are noise here
    logged = steps // config.train.log_every
    assert len(scalars) == logged and len({e.step for e in scalars}) == logged, "each logged step once, every group"
    assert scalars[-1].value == pytest.approx(result["loss"]), "the last scalar is the run's final loss"
    samples = _read_samples(config.run_dir)
    assert sorted(samples) == [0, 1] and all(len(keys) == steps * 4 for keys in samples.values())
    owner = _shard_of_key(demo.train)
    assert not {owner[k] for k in samples[0]} & {owner[k] for k in samples[1]}, "each rank reads its own shards"


def test_evaluator_with_two_ray_workers_counts_each_eval_image_once(two_node_cluster, tiny_demo, tmp_path):
    from pipeline.checkpoint.checkpointer import Checkpointer
    from pipeline.evaluation.evaluator import evaluate_checkpoint

    config = load_config("demo", ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                                  f"data.train={tiny_demo.train}", f"data.eval={tiny_demo.eval}",
                                  f"model.num_classes={tiny_demo.num_classes}", f"run.storage={tmp_path}",
                                  "checkpoint.background=false", "eval.batch_size=16"])
    saver = Checkpointer(config.run_dir, config)
    saver.save(1, build_train_state(config).state_dict())
    url = latest_checkpoint(config.run_dir).url
    alone, shared = evaluate_checkpoint(url), evaluate_checkpoint(url, workers=2)
    assert alone.result.num_images == shared.result.num_images == 80
    assert shared.result.image_ids.tolist() == list(range(80))
    assert shared.result.map_at_k == pytest.approx(alone.result.map_at_k, abs=1e-6)
