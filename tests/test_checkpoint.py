"""Checkpoints: atomic publication, retention, background upload, and resume through the training loop."""

import io
import json
import logging
import shutil
import time
import uuid

import pytest
import torch
from conftest import copy_with_swapped_classes, restarted_after

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.format import (
    checkpoint_url,
    committed_checkpoints,
    latest_checkpoint,
    read_checkpoint,
    step_dirs,
)
from pipeline.config import load_config
from pipeline.storage import StorageError, exists, join_url, list_dir, read_bytes, write_bytes
from pipeline.train import loop
from pipeline.train.loop import train
from pipeline.train.step import build_train_state

TINY_MODEL = ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
              "data.loader_workers=1", "data.shuffle_buffer=64", "train.global_batch_size=8", "train.log_every=2",
              "train.ema_decay=0.9"]


def tiny_config(demo, run_storage, *extra):
    return load_config("demo", [*TINY_MODEL, f"data.train={demo.train}", f"data.eval={demo.eval}",
                                f"model.num_classes={demo.num_classes}", f"run.storage={run_storage}", *extra])


def assert_trees_close(actual, expected, path="state"):
    """Tensors to float tolerance (integer tensors exactly), floats approximately, everything else exactly."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=path)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key, value in expected.items():
            assert_trees_close(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_trees_close(a, e, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-6), path
    else:
        assert actual == expected, path


@pytest.mark.parametrize("background", [False, True])
def test_partial_checkpoint_is_never_loaded_and_retention_keeps_last_and_every(tmp_path, background):
    config = load_config("demo", [*TINY_MODEL, "model.num_classes=5", f"run.storage={tmp_path}",
                                  "checkpoint.keep_last=2", "checkpoint.keep_every=4",
                                  f"checkpoint.background={str(background).lower()}"])
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    for step in (2, 4, 6, 8, 10):
        state.step = step
        saver.save(step, state.state_dict(), {"ranks": [{"step": step}]})
        saver.wait()
    assert [r.step for r in committed_checkpoints(config.run_dir)] == [4, 8, 10]
    assert read_bytes(join_url(config.run_dir, "checkpoints", "LATEST")) == b"step-000000010"

    # A writer that died before its COMMIT: files present, marker absent -> invisible, and cleaned up later.
    partial = join_url(config.run_dir, "checkpoints", "step-000000012")
    write_bytes(join_url(partial, "state.pt"), b"half a checkpoint")
    assert latest_checkpoint(config.run_dir).step == 10
    restored = read_checkpoint(latest_checkpoint(config.run_dir).url)
    assert restored["state"]["counters"]["step"] == 10 and restored["loader"] == {"ranks": [{"step": 10}]}
    state.step = 14
    saver.save(14, state.state_dict())
    saver.wait()
    assert 12 not in [r.step for r in step_dirs(config.run_dir)]
    assert [r.step for r in committed_checkpoints(config.run_dir)] == [4, 8, 10, 14]


def test_checkpoint_loads_with_weights_only_and_snapshot_is_taken_at_save_time(tmp_path):
    config = load_config("demo", [*TINY_MODEL, "model.num_classes=5", f"run.storage={tmp_path}",
                                  "checkpoint.background=true"])
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    name, param = next(iter(state.model.state_dict().items()))
    before = param.clone()
    saver.save(1, state.state_dict())
    with torch.no_grad():
        param.add_(1.0)  # training goes on while the upload runs
    saver.wait()
    ref = latest_checkpoint(config.run_dir)
    loaded = torch.load(io.BytesIO(read_bytes(join_url(ref.url, "state.pt"))), weights_only=True)
    assert torch.equal(loaded["model"][name], before)
    commit = json.loads(read_bytes(join_url(ref.url, "COMMIT")))
    assert commit["step"] == 1 and "state.pt" in commit["files"]
    saved = tmp_path / "saved.yaml"
    saved.write_bytes(read_bytes(join_url(ref.url, "config.yaml")))
    assert load_config(str(saved)) == config


def test_training_resumes_a_finished_run_with_more_steps(tiny_demo, tmp_path):
    first = train(tiny_config(tiny_demo, tmp_path, "train.total_steps=4", "checkpoint.every_steps=2",
                              "train.log_samples=true"))
    assert first["step"] == 4
    assert [r.step for r in committed_checkpoints(join_url(str(tmp_path), "demo"))][-1] == 4
    longer = tiny_config(tiny_demo, tmp_path, "train.total_steps=7", "checkpoint.every_steps=2",
                         "train.log_samples=true")
    second = train(longer)
    assert second["step"] == 7 and second["samples_seen"] == 7 * 8
    restored = read_checkpoint(latest_checkpoint(longer.run_dir).url)
    assert restored["state"]["counters"] == {"step": 7, "samples_seen": 56, "skipped_nonfinite": 0}
    fingerprint = restored["commit"]["class_fingerprint"]  # what the class ids mean travels with every checkpoint
    assert fingerprint["classes"] == join_url(tiny_demo.train, "classes.tsv")
    assert fingerprint["num_classes"] == tiny_demo.num_classes and len(fingerprint["sha256"]) == 64
    # The data position carried over: 7 steps x 8 images, no image twice within the epoch (320 images).
    keys = []
    for step in (2, 4, 6, 7):
        keys += json.loads(read_bytes(join_url(longer.run_dir, "samples", f"rank-00000-step-{step:09d}.json")))
    assert len(keys) == 56 and len(set(keys)) == 56


def test_interrupted_run_resumes_from_its_last_complete_checkpoint(tiny_demo, tmp_path):
    # The resumed run matches only if the RNG state travels with the checkpoint. A step schedule: the demo's cosine
    # follows train.total_steps, so stopping at 3 of 3 and extending to 6 would re-plan it.
    dropout = ["model.dropout=0.5", "schedule.name=step"]
    config = tiny_config(tiny_demo, tmp_path, "train.total_steps=6", "checkpoint.every_steps=3",
                         "train.log_samples=true", *dropout)
    reference_config = tiny_config(tiny_demo, tmp_path / "ref", "train.total_steps=6", "checkpoint.every_steps=3",
                                   *dropout)
    reference = train(reference_config)
    train(tiny_config(tiny_demo, tmp_path, "train.total_steps=3", "checkpoint.every_steps=3",
                      "train.log_samples=true", *dropout))
    # Simulate a crash after step 3 during the next checkpoint's upload: a partial step-6 directory.
    write_bytes(join_url(config.run_dir, "checkpoints", "step-000000006", "state.pt"), b"torn")
    resumed = train(config)
    assert resumed["step"] == 6
    assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert exists(join_url(config.run_dir, "checkpoints", "step-000000006", "COMMIT"))
    # Not only the loss: the final checkpoints hold the same model, EMA, optimizer state, counters, RNG states and
    # data position as the uninterrupted run's.
    ours, theirs = (read_checkpoint(latest_checkpoint(c.run_dir).url) for c in (config, reference_config))
    assert set(theirs["state"]) == {"model", "ema", "optimizer", "counters", "rng"}
    assert_trees_close(ours["state"], theirs["state"])
    assert ours["loader"] == theirs["loader"]


def test_tensorboard_events_reach_object_storage_at_every_checkpoint_and_on_failure(tiny_demo, tmp_path,
                                                                                    monkeypatch):
    """A remote run directory gets its TensorBoard events with each checkpoint (visible while the run trains) and
    when the run fails, not only when it ends."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tiny_demo, f"memory://{uuid.uuid4().hex}", "train.total_steps=6", "checkpoint.every_steps=2",
                         "train.log_every=1", "checkpoint.background=false")
    remote = join_url(config.run_dir, "tensorboard")

    def published_steps() -> list[int]:
        local = tmp_path / uuid.uuid4().hex
        local.mkdir()
        for url in list_dir(remote) if exists(remote) else []:
            (local / url.rsplit("/", 1)[-1]).write_bytes(read_bytes(url))
        events = EventAccumulator(str(local))
        events.Reload()
        return [e.step for e in events.Scalars("loss")] if "loss" in events.Tags()["scalars"] else []

    seen = {}
    step = loop.train_step

    def failing_step(state, *args, **kwargs):
        seen[state.step] = published_steps()  # what a TensorBoard reading the bucket shows before this step
        if state.step == 3:
            raise RuntimeError("worker lost")
        return step(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="worker lost"):
        train(config)
    assert seen == {0: [], 1: [], 2: [1, 2], 3: [1, 2]}  # published with the step-2 checkpoint
    assert published_steps() == [1, 2, 3]  # and when the run failed


def test_prepare_resolves_paths_and_refuses_impossible_launches(tiny_demo, tmp_path, monkeypatch):
    from pipeline.data.loading import ShardSplitError
    from pipeline.train.launcher import prepare

    monkeypatch.chdir(tmp_path)
    ready = prepare(tiny_config(tiny_demo, "relative-runs"))
    assert ready.run.storage == str(tmp_path / "relative-runs")
    with pytest.raises(ValueError, match=f"set model.num_classes={tiny_demo.num_classes}"):
        prepare(tiny_config(tiny_demo, tmp_path, "model.num_classes=7"))
    with pytest.raises(ShardSplitError, match="8 non-empty shards"):  # 4 ranks x 3 loader workers > 8 shards
        prepare(tiny_config(tiny_demo, tmp_path, "cluster.num_workers=4", "data.loader_workers=3"))
    swapped = copy_with_swapped_classes(tiny_demo.eval, tmp_path / "swapped-eval")
    with pytest.raises(ValueError, match=r"eval data's classes .* are not the model's"):
        prepare(tiny_config(tiny_demo, tmp_path, f"data.eval={swapped}"))
    with pytest.raises(ShardSplitError, match="no full batch"):  # 80 samples per loader worker, batches of 96
        prepare(tiny_config(tiny_demo, tmp_path, "cluster.num_workers=2", "data.loader_workers=2",
                            "train.global_batch_size=192", "train.micro_batches=1"))
    no_classes = tmp_path / "no-classes"
    shutil.copytree(tiny_demo.train, no_classes)
    (no_classes / "classes.tsv").unlink()  # training's rank 0 reads it for every COMMIT: refused before launch
    with pytest.raises(StorageError, match=r"classes\.tsv: not found"):
        prepare(tiny_config(tiny_demo, tmp_path, f"data.train={no_classes}", "data.eval=null"))


def test_scheduled_steps_are_the_steps_training_checkpoints_at():
    from pipeline.checkpoint.format import is_checkpoint_step, scheduled_steps

    assert scheduled_steps(2, 7, 7) == [2, 4, 6, 7] and scheduled_steps(2, 7, 5) == [2, 4]
    for every in (1, 2, 3, 5):
        for total in (1, 3, 9, 10):
            for until in (0, 4, 12):
                expected = [s for s in range(1, min(until, total) + 1) if is_checkpoint_step(s, every, total)]
                assert scheduled_steps(every, total, until) == expected, (every, total, until)


def test_logged_throughput_counts_the_time_spent_logging_and_ray_hears_only_at_checkpoints(tiny_demo, tmp_path,
                                                                                           monkeypatch):
    """samples/s covers all wall time between two logged steps: a record that takes 0.3 s to write caps the next
    window's figure at batch / 0.3 s. Ray Train's report (a barrier) is called at checkpoint steps only."""
    from pipeline.train.scalars import ScalarWriter

    records, reported = [], []
    write = ScalarWriter.write

    def slow_write(self, record):
        records.append(record)
        write(self, record)
        time.sleep(0.3)

    monkeypatch.setattr(ScalarWriter, "write", slow_write)
    config = tiny_config(tiny_demo, tmp_path, "train.total_steps=6", "train.log_every=1", "checkpoint.every_steps=3",
                         "train.global_batch_size=4", "checkpoint.background=false")
    train(config, report=lambda record, checkpoint: reported.append((record["step"], checkpoint)))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["samples_per_s"] <= 4 / 0.3 for r in records[1:]), [r["samples_per_s"] for r in records]
    # Each committed checkpoint goes to Ray once, with the report after its commit (here at once: no background).
    assert reported == [(3, checkpoint_url(config.run_dir, 3)), (6, checkpoint_url(config.run_dir, 6))]


def test_format_round_trip_and_deletion_unpublishes_first(tmp_path, monkeypatch):
    """The format owner's writer and readers agree; a deletion removes COMMIT before anything else."""
    from pipeline.checkpoint import format as checkpoints

    config = load_config("demo", [*TINY_MODEL, "model.num_classes=5", f"run.storage={tmp_path}"])
    state = {"counters": {"step": 3, "samples_seen": 24}, "weights": torch.arange(4.0)}
    commit = checkpoints.write_checkpoint(config.run_dir, 3, state, config, {"ranks": [{"p": 1}]}, {"note": "x"})
    url = checkpoints.checkpoint_url(config.run_dir, 3)
    assert checkpoints.is_committed(url) and checkpoints.read_commit(url) == commit
    assert commit["files"] == ["state.pt", "config.yaml", "loader.json"] and commit["note"] == "x"
    assert checkpoints.read_checkpoint_config(url) == config
    assert torch.equal(checkpoints.read_checkpoint_state(url)["weights"], torch.arange(4.0))
    assert checkpoints.read_checkpoint(url)["loader"] == {"ranks": [{"p": 1}]}
    assert read_bytes(join_url(config.run_dir, "checkpoints", "LATEST")) == b"step-000000003"
    removed = []
    monkeypatch.setattr(checkpoints, "remove", lambda target, *a, **k: removed.append(target))
    checkpoints.delete_checkpoint(url)
    assert removed == [join_url(url, "COMMIT"), url]


def test_find_checkpoint_and_pick_weights_read_the_format(tmp_path):
    """A URL names a committed checkpoint itself, or a run directory's newest one; EMA or raw weights by layout, and
    EMA weights asked of a run that kept none are refused (the package's one policy), naming the checkpoint."""
    from pipeline.checkpoint import format as checkpoints

    config = load_config("demo", [*TINY_MODEL, "model.num_classes=5", f"run.storage={tmp_path}"])
    for step in (2, 4):
        checkpoints.write_checkpoint(config.run_dir, step, {"counters": {"step": step}}, config, None, {})
    write_bytes(join_url(config.run_dir, "checkpoints", "step-000000006", "state.pt"), b"torn")  # no COMMIT
    second = checkpoints.checkpoint_url(config.run_dir, 2)
    assert checkpoints.find_checkpoint(config.run_dir).step == 4
    assert checkpoints.find_checkpoint(second + "/") == checkpoints.CheckpointRef(second, 2)
    torn = checkpoints.checkpoint_url(config.run_dir, 6)
    assert checkpoints.find_checkpoint(torn) is None and checkpoints.is_step_dir(torn)
    assert checkpoints.find_checkpoint(str(tmp_path / "nothing")) is None and not checkpoints.is_step_dir(str(tmp_path))
    state = {"model": {"w": torch.zeros(1)}, "ema": {"shadow": {"w": torch.ones(1)}}}
    assert checkpoints.pick_weights(state, "raw", "here") is state["model"]
    assert checkpoints.pick_weights(state, "ema", "here") is state["ema"]["shadow"]
    with pytest.raises(checkpoints.MissingEmaWeights, match=r"here has no EMA weights.*raw weights"):
        checkpoints.pick_weights({**state, "ema": None}, "ema", "here")
    assert issubclass(checkpoints.MissingEmaWeights, ValueError)  # a refused input: one line, exit code 2


def test_rank_rng_restores_its_own_state_only_with_the_same_world_size():
    from pipeline.train.rng import RankRng

    ranks = [RankRng(rank=rank, world_size=2, device=torch.device("cpu")) for rank in (0, 1)]
    states, draws = [], []
    for rng in ranks:
        rng.seed(0)  # seed + rank: different streams
        states.append(rng.state_dict())
        draws.append(torch.rand(3))
    rng = ranks[1]
    rng.load_state_dict(states)
    assert torch.equal(torch.rand(3), draws[1]) and not torch.equal(draws[0], draws[1])
    expected = draws[1]
    rng.load_state_dict(states[:1])  # another world size: left as it is (seed + rank)
    assert not torch.equal(torch.rand(3), expected)


@pytest.mark.slow  # the store stopped and started again: ~10-20 s
def test_a_checkpoint_save_outlasts_an_outage_of_the_store_and_logs_it_when_it_happens(restartable_s3, caplog):
    """The store is down when the save starts and back ~6 s later (a restart takes ~2.5 s): the outage's first line
    comes at once, and the one recovery line counts from the first failure, not from the last call's retries."""
    server, storage = restartable_s3
    storage = storage.model_copy(update={"retries": 1, "outage_budget_s": 60.0})  # each call gives up quickly
    config = load_config("demo", [*TINY_MODEL, "model.num_classes=5", "run.storage=s3://restart/runs",
                                  "checkpoint.background=false"])
    saver = Checkpointer(config.run_dir, config, storage)
    state = build_train_state(config).state_dict()
    server.stop()
    started = time.time()
    with restarted_after(server, 3.5), caplog.at_level(logging.INFO, logger="pipeline.storage.retries"):
        saver.save(7, state)
    took = time.time() - started
    assert latest_checkpoint(config.run_dir, storage).step == 7
    lines = [r for r in caplog.records if r.name == "pipeline.storage.retries"]
    waits = [r.getMessage() for r in lines if "trying again" in r.getMessage()]
    assert waits and all(m.startswith("checkpoint step 7: ") for m in waits), waits
    down = [r for r in lines if r.getMessage().startswith("storage unreachable")]
    assert len(down) == 1 and down[0].created < started + 3.5, [r.getMessage() for r in lines]  # while it was down
    back = [r.getMessage() for r in lines if r.getMessage().startswith("storage back after")]
    assert len(back) == 1 and back[0].split(" s (", 1)[1].startswith("checkpoint step 7; upload "), back
    waited, failing = float(back[0].split()[3]), started + took - down[0].created  # from the first failure on
    assert waited > 3.0 and abs(waited - failing) < 0.5, (waited, failing)
