"""Elastic training: the batch split at each world size, the checks for a range, equal results at every size, and
a Ray cluster that loses a node and gets it back while a run trains."""

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from paced_training import paced_runs

from pipeline.checkpoint.format import (
    checkpoint_url,
    committed_checkpoints,
    latest_checkpoint,
    read_checkpoint,
    read_commit,
)
from pipeline.config import ConfigError, config_to_yaml, load_config
from pipeline.config.batching import BatchSplitError
from pipeline.data.loading import ShardSplitError
from pipeline.storage import join_url, list_dir, read_bytes, write_bytes
from pipeline.train.audit import SampleAudit
from pipeline.train.elastic import scaling_arguments
from pipeline.train.loop import wrap_model
from pipeline.train.ranks import WorkerContext
from pipeline.train.step import build_train_state, train_step

TINY = ["model.width_multiplier=0.125", "model.middle_blocks=1", "model.num_classes=10", "data.image_size=71",
        "train.precision=fp32", "train.channels_last=false",  # the equivalence is exact in fp32
        "optimizer.lr=0.01", "train.ema_decay=0.9"]


def test_the_split_at_each_world_size_keeps_the_global_batch(tmp_path):
    config = load_config("demo", ["cluster.num_workers=[1,4]", "train.global_batch_size=48",
                                  "train.max_micro_batch_size=8", "cluster.resize_check_s=5"])
    splits = [config.batch_split(size) for size in config.cluster.world_sizes]
    assert [(s.world_size, s.per_rank, s.micro_batches, s.per_rank // s.micro_batches) for s in splits] == [
        (1, 48, 6, 8), (2, 24, 3, 8), (3, 16, 2, 8), (4, 12, 2, 6)]  # 12 in passes of <= 8: two of 6
    assert all(s.per_rank % s.micro_batches == 0 for s in splits)  # every pass the same size (BatchNorm's batch)
    assert all(s.world_size * s.per_rank == 48 for s in splits)
    with pytest.raises(BatchSplitError, match=r"must be divisible by cluster\.num_workers=5"):
        config.batch_split(5)
    assert scaling_arguments(config) == {"num_workers": (1, 4), "elastic_resize_monitor_interval_s": 5.0}
    assert scaling_arguments(load_config("demo", ["cluster.num_workers=2"])) == {"num_workers": 2}
    path = tmp_path / "saved.yaml"  # checkpoints and Ray workers re-read the saved config
    path.write_text(config_to_yaml(config))
    assert load_config(str(path)) == config and load_config(str(path)).cluster.num_workers == [1, 4]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["cluster.num_workers=[1,4]", "train.global_batch_size=32"],
     "cluster.num_workers=[1, 4] lets Ray run any number of workers in that range, and 1 of them cannot work (3): at "
     "3: train.global_batch_size=32 must be divisible by cluster.num_workers=3 (the global batch is split evenly "
     "across DDP ranks). train.global_batch_size=36 splits at every size"),
    (["cluster.num_workers=[2,4]", "train.global_batch_size=24", "train.micro_batches=4"],
     "1 of them cannot work (4): at 4: train.micro_batches=4 must divide the per-worker batch 6"),
    (["cluster.num_workers=[3,1]"], "config key 'cluster.num_workers' = [3, 1]: must be a number or a [min, max] pair"),
    (["train.micro_batches=2", "train.max_micro_batch_size=4"], "both set the micro-batches: set one"),
    # a single size keeps its own message
    (["train.global_batch_size=33", "cluster.num_workers=2"],
     "train.global_batch_size=33 must be divisible by cluster.num_workers=2 (the global"),
])
def test_settings_that_cannot_split_are_refused_naming_the_sizes(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    assert expected in str(info.value)


def test_preflight_checks_the_shards_at_every_size_of_the_range(tiny_demo, tmp_path):
    from pipeline.train.launcher import preflight

    base = ["data.loader_workers=2", f"data.train={tiny_demo.train}", f"data.eval={tiny_demo.eval}",
            f"model.num_classes={tiny_demo.num_classes}", f"run.storage={tmp_path}"]
    # 8 shards: 5 or 6 ranks x 2 loader workers have too few; 60 images split at every size from 2 to 6.
    with pytest.raises(ShardSplitError) as info:
        preflight(load_config("demo", [*base, "cluster.num_workers=[2,6]", "train.global_batch_size=60"]))
    message = str(info.value)
    assert "cluster.num_workers=[2, 6]" in message and "2 of them cannot work (5, 6)" in message
    assert "at 5: the dataset has 8 non-empty shards but 5 ranks x 2 loader workers = 10 slots" in message
    assert message.endswith("Only 2, 3, 4 can work")
    preflight(load_config("demo", [*base, "cluster.num_workers=[2,4]", "train.global_batch_size=60"]))
    with pytest.raises(ShardSplitError) as single:  # one size: today's message, as it was
        preflight(load_config("demo", [*base, "cluster.num_workers=5", "train.global_batch_size=60"]))
    assert str(single.value).startswith("the dataset has 8 non-empty shards but 5 ranks x 2 loader workers")


def test_a_resumed_run_forgets_audit_files_of_steps_it_trains_again(tmp_path):
    """A shrunk run re-trains the steps after its checkpoint with fewer ranks: the old ranks' files of those steps
    would otherwise stay and count their samples twice."""
    config = load_config("demo", [f"run.storage={tmp_path}", "train.log_samples=true"])
    for rank in (0, 1):
        for step in (4, 8, 12):
            write_bytes(join_url(config.run_dir, "samples", f"rank-{rank:05d}-step-{step:09d}.json"), b"[]")
    SampleAudit(config, WorkerContext(rank=1, world_size=2), write_at=bool).forget_after(4)  # only rank 0 removes
    assert len(list_dir(join_url(config.run_dir, "samples"))) == 6
    audit = SampleAudit(config, WorkerContext(), write_at=lambda step: step % 4 == 0)
    audit.forget_after(8)
    names = [url.rsplit("/", 1)[-1] for url in list_dir(join_url(config.run_dir, "samples"))]
    assert names == [f"rank-{r:05d}-step-{s:09d}.json" for r in (0, 1) for s in (4, 8)]
    audit.record(12, SimpleNamespace(keys=["a", ""], valid=torch.tensor([True, False])))  # what it reads of a Batch
    assert json.loads(read_bytes(join_url(config.run_dir, "samples", "rank-00000-step-000000012.json"))) == ["a"]


# ------------------------------------------------------------------------------ equal results at every size


ELASTIC = [*TINY, "cluster.num_workers=[1,2]", "train.global_batch_size=8", "train.max_micro_batch_size=4"]


def _batch(step: int, size: int = 8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.rand(size, 3, 71, 71, generator=g) * 2 - 1, (torch.rand(size, 10, generator=g) < 0.3).float()


def _train(config, steps: int, ctx: WorkerContext) -> tuple[dict, list[tuple[float, int]]]:
    """`steps` steps of the global batches above at `ctx`'s world size, each rank on its share; (weights, the
    (lr, samples_seen) of every step)."""
    split = config.batch_split(ctx.world_size)
    state = build_train_state(config)
    state.model = wrap_model(state.model, config, ctx)
    trace = []
    for step in range(steps):
        images, targets = _batch(step)
        mine = slice(ctx.rank * split.per_rank, (ctx.rank + 1) * split.per_rank)
        result = train_step(state, config, images[mine], targets[mine],
                            global_batch_size=config.train.global_batch_size)
        trace.append((result.lr, state.samples_seen))
    model = getattr(state.model, "module", state.model)
    return {k: v.clone() for k, v in model.state_dict().items()}, trace


def _rank(rank: int, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    weights, trace = _train(load_config("demo", ELASTIC), steps, WorkerContext(rank=rank, world_size=2))
    if rank == 0:
        torch.save({"weights": weights, "trace": trace}, out)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on 2 cores
def test_two_ranks_train_as_one_rank_that_accumulates(tmp_path):
    """The split chosen at 2 ranks (4 images each, one pass) and at 1 rank (8 images in two passes of 4, the
    max_micro_batch_size) train identically: the same weights, learning rates and samples seen."""
    steps, out = 3, str(tmp_path / "two.pt")
    mp.spawn(_rank, args=(29500 + os.getpid() % 1000 + 7, steps, out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    config = load_config("demo", ELASTIC)
    assert config.batch_split(1).micro_batches == 2 and config.batch_split(2).micro_batches == 1
    one, trace = _train(config, steps, WorkerContext())
    assert trace == [tuple(t) for t in two["trace"]] and trace[-1][1] == steps * 8
    compared = 0
    for name, value in one.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(two["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)
            compared += 1
    assert compared > 10
    # Control: one pass of 8 at 1 rank (BatchNorm over 8 images) trains differently.
    whole, _ = _train(load_config("demo", [*TINY, "train.global_batch_size=8"]), steps, WorkerContext())
    name = "entry_flow.conv1.weight"
    assert not torch.allclose(whole[name], one[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- Ray: shrink and grow back


@pytest.fixture
def head_and_two_workers(ray_cluster):
    """The session's shared Ray cluster (conftest.py): a head node without CPUs (Ray Train's controller, no
    training worker) and two 1-CPU worker nodes."""
    return ray_cluster, list(ray_cluster.worker_nodes)


def _groups(run_dir: str) -> list[tuple[int, int, int, int]]:
    """(start step, world size, per-rank batch, micro-batches) of every worker group the run started, in order."""
    records = [json.loads(read_bytes(url)) for url in list_dir(join_url(run_dir, "worker_groups"))]
    return [(r["start_step"], r["world_size"], r["per_rank_batch"], r["micro_batches"]) for r in records]


@pytest.mark.slow  # a 3-node Ray cluster and three worker groups: about two minutes on 2 cores
def test_a_run_shrinks_when_a_node_is_lost_and_grows_back_when_one_is_added(head_and_two_workers, tiny_demo,
                                                                            tmp_path, monkeypatch):
    from pipeline.train import launcher

    cluster, nodes = head_and_two_workers
    gate = paced_runs(monkeypatch, tmp_path, steps=8)  # where the run is when a node goes and comes is the test's
    config = launcher.prepare(load_config("demo", [
        "model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71", "data.loader_workers=1",
        "data.shuffle_buffer=32", f"data.train={tiny_demo.train}", f"data.eval={tiny_demo.eval}",
        f"model.num_classes={tiny_demo.num_classes}", "train.global_batch_size=8", "train.max_micro_batch_size=4",
        "cluster.num_workers=[1,2]", "cluster.resize_check_s=2", "cluster.max_failures=1", "train.total_steps=24",
        "checkpoint.every_steps=4", "checkpoint.keep_last=10", "checkpoint.background=false", "train.log_every=2",
        "train.log_samples=true", f"run.storage={tmp_path / 'runs'}", "run.name=elastic"]))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launcher.launch(config)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait_for(what: str, done) -> None:
        deadline = time.time() + 240
        while time.time() < deadline and thread.is_alive():
            if done():
                return
            time.sleep(0.5)
        pytest.fail(f"{what} did not happen: {outcome or 'still training'}; worker groups {_groups(config.run_dir)}")

    def checkpointed(step: int):
        return lambda: (latest_checkpoint(config.run_dir) or SimpleNamespace(step=-1)).step == step

    wait_for("checkpoint 8 with 2 workers", checkpointed(8))
    cluster.remove_node(nodes[1])  # its worker dies with it; the run goes on with the other node's
    wait_for("a restart with 1 worker", lambda: len(_groups(config.run_dir)) == 2)
    gate.allow(12)
    wait_for("checkpoint 12 with 1 worker", checkpointed(12))
    cluster.add_node(num_cpus=1)
    wait_for("a restart with 2 workers", lambda: len(_groups(config.run_dir)) == 3)
    gate.allow(24)
    thread.join(timeout=300)
    assert "result" in outcome, f"training did not finish: {outcome}"
    assert (outcome["result"]["step"], outcome["result"]["samples_seen"]) == (24, 24 * 8)
    # Shrunk at the node loss, grown back with the new node, each time from the latest checkpoint, the global batch
    # of 8 kept (1 rank: two passes of 4); a grow is no failure to Ray (cluster.max_failures=1 went to the lost node).
    assert _groups(config.run_dir) == [(0, 2, 4, 1), (8, 1, 8, 2), (12, 2, 4, 1)]
    first = json.loads(read_bytes(join_url(config.run_dir, "workers", "rank-00000.json")))  # the latest group's
    assert (first["start_step"], first["world_size"], first["per_rank_batch"], first["micro_batches"]) == (12, 2, 4, 1)
    ranks_at = {ref.step: len(read_checkpoint(ref.url)["loader"]["ranks"])
                for ref in committed_checkpoints(config.run_dir)}
    assert ranks_at == {4: 2, 8: 2, 12: 1, 16: 2, 20: 2, 24: 2}
    assert read_commit(checkpoint_url(config.run_dir, 12))["metrics"]["world_size"] == 1
    # The audit: every step's 8 samples on record once, no sample twice in the epoch (all 24 steps are in epoch 0:
    # 40 steps of 8 make one), across both re-splits of the rest of the epoch.
    keys, files = [], list_dir(join_url(config.run_dir, "samples"))
    for url in files:
        keys += json.loads(read_bytes(url))
    assert len(keys) == 24 * 8 and len(set(keys)) == len(keys)
    names = {url.rsplit("/", 1)[-1] for url in files}
    assert "rank-00001-step-000000012.json" not in names and "rank-00001-step-000000016.json" in names
