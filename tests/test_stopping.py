"""Stopping together: a SIGTERM checkpoints the last completed step and the resume redoes nothing; one rank's bad data
stops every rank at the same step; deterministic stops are recorded, not retried, and end a job with exit code 2."""

import itertools
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from test_checkpoint import assert_trees_close, tiny_config

from pipeline.checkpoint.format import committed_checkpoints, latest_checkpoint, read_checkpoint, read_commit
from pipeline.cli import EXIT_REFUSED, job_main
from pipeline.data.loading import BadDataError
from pipeline.storage import join_url, list_dir, read_bytes
from pipeline.train import loop, stopping
from pipeline.train.faults import (
    PreemptionNotice,
    accepting_notices,
    preemption_noticed,
    raise_recorded_failure,
    record_failure,
)
from pipeline.train.ranks import WorkerContext, mean_over_ranks
from pipeline.train.ray_internals import Preempted
from pipeline.train.step import NonFiniteError
from pipeline.train.stopping import StopAgreement, StopReason


@pytest.fixture
def sigterm_handler():
    """The preemption handler in this (main) thread, and the process's own handler back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    assert PreemptionNotice.install()
    yield
    signal.signal(signal.SIGTERM, previous)


def sigterm_after_step(monkeypatch, at_step: int) -> None:
    """A real SIGTERM to this process right after the loop's step `at_step` (the signal arrives mid-loop)."""
    real_step = loop.train_step

    def step_then_signal(state, *args, **kwargs):
        result = real_step(state, *args, **kwargs)
        if state.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop, "train_step", step_then_signal)


def test_sigterm_checkpoints_the_last_completed_step_and_the_resume_redoes_nothing(tiny_demo, tmp_path,
                                                                                 monkeypatch, sigterm_handler):
    # The signal arrives during step 4; every rank finishes step 5, whose batch it holds, and checkpoints it. Step 5
    # is no scheduled checkpoint (every 3): without the preemption checkpoint the resume would redo steps 4 and 5.
    options = ["train.total_steps=6", "checkpoint.every_steps=3", "train.log_samples=true", "model.dropout=0.5",
               "schedule.name=step"]
    config = tiny_config(tiny_demo, tmp_path, *options)
    reference_config = tiny_config(tiny_demo, tmp_path / "ref", *options)
    reference = loop.train(reference_config)

    sigterm_after_step(monkeypatch, at_step=4)
    with pytest.raises(Preempted, match=r"preempted \(SIGTERM\) after step 5") as caught:
        loop.train(config)
    assert caught.value.step == 5
    assert [ref.step for ref in committed_checkpoints(config.run_dir)] == [3, 5]
    assert read_commit(latest_checkpoint(config.run_dir).url)["stopped"] == "preempted"

    monkeypatch.undo()  # no more signals
    assert PreemptionNotice.install()  # a new worker process: no notice yet
    resumed = loop.train(config)
    assert resumed["step"] == 6
    rank_info = json.loads(read_bytes(join_url(config.run_dir, "workers", "rank-00000.json")))
    assert rank_info["start_step"] == 5, "the resume starts where the preempted run stopped"
    # The preempted-and-resumed run is the uninterrupted one: same model, EMA, optimizer, RNG and data position.
    ours, theirs = (read_checkpoint(latest_checkpoint(c.run_dir).url) for c in (config, reference_config))
    assert ours["loader"] == theirs["loader"]
    assert_trees_close(ours["state"], theirs["state"])
    assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    # The audit has every step's keys once: the preemption checkpoint wrote the keys of steps 4 and 5 first.
    files = sorted(url.rsplit("/", 1)[-1] for url in list_dir(join_url(config.run_dir, "samples")))
    assert files == [f"rank-00000-step-{s:09d}.json" for s in (3, 5, 6)]
    keys = [k for f in files for k in json.loads(read_bytes(join_url(config.run_dir, "samples", f)))]
    assert len(keys) == 6 * 8 and len(set(keys)) == len(keys)


def test_sigterm_outside_training_and_a_second_one_go_to_the_previous_handler():
    previous_calls = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: previous_calls.append(signum))
    try:
        assert PreemptionNotice.install()
        os.kill(os.getpid(), signal.SIGTERM)  # no training loop yet: as before (Ray's handler ends the process)
        assert not preemption_noticed() and previous_calls == [signal.SIGTERM]
        stops = StopAgreement(WorkerContext())
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption_noticed() and previous_calls == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # "now"
        assert previous_calls == [signal.SIGTERM] * 2
        stops.close()
        assert PreemptionNotice.install()  # a fresh handler: its earlier notice forgotten, the same previous one
        os.kill(os.getpid(), signal.SIGTERM)  # the loop is over: Ray ending the worker group is no notice
        assert not preemption_noticed() and previous_calls == [signal.SIGTERM] * 3
        with accepting_notices():  # a Ray worker's whole training function: its start-up too
            os.kill(os.getpid(), signal.SIGTERM)  # while it restores, before the loop's agreement exists
            assert preemption_noticed() and previous_calls == [signal.SIGTERM] * 3
            stops = StopAgreement(WorkerContext())
            assert stops.agree() is StopReason.PREEMPTED, "the first step acts on it"
            stops.close()
    finally:
        signal.signal(signal.SIGTERM, original)


def _agreeing_rank(rank: int, port: int, out: str) -> None:
    """Three steps on 2 gloo ranks: nothing; rank 0 gets a real SIGTERM; rank 1's data fails. Rank 0's clock asks
    for Ray's drain notices every step, rank 1's never: both ask at the same steps (Ray's call is a barrier)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    PreemptionNotice.install()
    polls = []
    stops = StopAgreement(WorkerContext(rank=rank, world_size=2), poll_drains=lambda: polls.append(1),
                          poll_interval_s=0.0 if rank == 0 else 1e9)
    outcome = {"step0": stops.agree().name}
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    outcome["step1"] = stops.agree().name
    PreemptionNotice.install()  # the notice forgotten: the next request is rank 1's alone
    if rank == 1:
        stops.bad_data(BadDataError("300 of 1000 samples read by rank 1 were bad"))
    try:
        stops.agree()
    except BadDataError as error:
        outcome["step2"] = str(error)
    outcome["mean_loss"] = mean_over_ranks(float(rank + 1), WorkerContext(rank=rank, world_size=2))
    outcome["polls"] = len(polls)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


def test_every_rank_stops_at_the_same_step_for_one_rank_s_notice_or_bad_data(tmp_path):
    out = str(tmp_path / "agree")
    mp.spawn(_agreeing_rank, args=(29700 + os.getpid() % 200, out), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"agree.rank{rank}.json").read_text()) for rank in range(2)]
    assert [o["step0"] for o in outcomes] == [StopReason.NONE.name] * 2
    assert [o["step1"] for o in outcomes] == [StopReason.PREEMPTED.name] * 2
    assert outcomes[1]["step2"] == "300 of 1000 samples read by rank 1 were bad"
    assert outcomes[0]["step2"] == "(reported by rank 1) 300 of 1000 samples read by rank 1 were bad"
    assert [o["mean_loss"] for o in outcomes] == [1.5, 1.5], "the logged loss is the ranks' mean, on every rank"
    assert [o["polls"] for o in outcomes] == [2, 2], "every rank asks Ray at the same steps (not at the bad-data one)"


def _drain(ranks, seconds_left):
    return SimpleNamespace(preempted_ranks=ranks, deadline_ms=(time.time() + seconds_left) * 1000)


def test_a_ray_drain_notice_is_polled_at_the_interval_and_becomes_a_preemption():
    answers = [None, None, _drain([1], 30)]
    stops = StopAgreement(WorkerContext(), poll_drains=lambda: answers.pop(0), poll_interval_s=0.0)
    try:
        reasons = []
        for _ in range(3):
            reasons.append(stops.agree())
            time.sleep(0.01)  # a step
        assert reasons == [StopReason.NONE, StopReason.NONE, StopReason.PREEMPTED]
        assert stops.notice.startswith("node drain of ranks [1], deadline in 3") and not answers
        error = stops.preempted(7, "s3://b/run/checkpoints/step-000000007")
        assert isinstance(error, Preempted) and error.step == 7 and error.preempted  # Ray: a preemption, no failure
        assert str(error) == ("preempted (node drain of ranks [1], deadline in 30 s) after step 7: the run resumes "
                              "from checkpoint s3://b/run/checkpoints/step-000000007")
    finally:
        stops.close()
    rare = StopAgreement(WorkerContext(), poll_drains=lambda: pytest.fail("polled before its interval"),
                         poll_interval_s=3600)
    assert rare.agree() is StopReason.NONE
    rare.close()


def test_a_costly_drain_poll_is_made_less_often(monkeypatch):
    """A poll of 20 ms may take 0.5% of the time at most: at least 4 s apart, whatever the configured interval."""
    clock = [0.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])

    def poll():
        clock[0] += 0.020
        return None

    stops = StopAgreement(WorkerContext(), poll_drains=poll, poll_interval_s=1.0, poll_budget=0.005)
    polled_at = []
    for _ in range(100):  # 100 steps of 0.1 s
        clock[0] += 0.1
        before = clock[0]
        stops.agree()
        if clock[0] > before:
            polled_at.append(round(before, 2))
    stops.close()
    assert 1.0 <= polled_at[0] <= 1.1, "first at the configured interval"
    assert all(b - a >= 4.0 for a, b in itertools.pairwise(polled_at)) and len(polled_at) == 3


def test_a_drain_notice_mid_run_checkpoints_that_step_reports_it_to_ray_and_the_resume_redoes_nothing(
        tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path, "train.total_steps=6", "checkpoint.every_steps=3",
                         "cluster.preemption_poll_s=0.000001")
    calls = []
    answers = iter([None] * 4 + [_drain([0], 60)])  # the 5th step's agreement sees the drain
    reports = []  # (metrics record's step, checkpoint URL)
    with pytest.raises(Preempted, match=r"preempted \(node drain of ranks \[0\].*\) after step 5") as caught:
        loop.train(config, report=lambda metrics, url: reports.append((metrics["step"], url)),
                   poll_drains=lambda: calls.append(1) or next(answers))
    assert caught.value.step == 5 and len(calls) == 5
    assert [ref.step for ref in committed_checkpoints(config.run_dir)] == [3, 5]
    # Ray hears of each committed checkpoint once: step 3's at step 3 (waited for only at the preemption) or not
    # yet, the preemption's at once.
    assert reports[-1][1] == latest_checkpoint(config.run_dir).url
    assert [url for _, url in reports].count(latest_checkpoint(config.run_dir).url) == 1
    resumed = loop.train(config, report=lambda metrics, url: reports.append((metrics["step"], url)))
    assert resumed["step"] == 6 and reports[-1] == (6, latest_checkpoint(config.run_dir).url)


def test_bad_data_is_recorded_and_raised_again_like_a_nonfinite_stop(tmp_path):
    run_dir = str(tmp_path / "run")
    record_failure(run_dir, BadDataError("120 of 1000 samples read by rank 0 were bad"))
    with pytest.raises(BadDataError, match="120 of 1000"):
        raise_recorded_failure(run_dir)


@pytest.mark.parametrize("error", [BadDataError("too many bad samples"), NonFiniteError("nan at step 5", step=5)])
def test_a_deterministic_stop_ends_a_job_with_one_line_and_exit_code_2(capsys, error):
    def main(argv):
        raise error

    assert job_main(main)([]) == EXIT_REFUSED
    assert capsys.readouterr().err.strip() == f"error: {type(error).__name__}: {error}"
