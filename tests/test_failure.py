"""A deterministic stop (NaN/Inf, too much bad data) is recorded by the workers and re-raised by the launcher, so
Ray Train does not retry it."""

import pickle
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loading import BadDataError
from pipeline.train import launcher
from pipeline.train.faults import clear_failure, raise_recorded_failure, record_failure
from pipeline.train.step import NonFiniteError


def test_recorded_failure_is_raised_with_its_step_until_cleared(tmp_path):
    run_dir = str(tmp_path / "run")
    raise_recorded_failure(run_dir)  # nothing recorded: nothing raised
    record_failure(run_dir, NonFiniteError("non-finite loss or gradients at step 7: loss=nan", step=7))
    with pytest.raises(NonFiniteError, match="at step 7") as caught:
        raise_recorded_failure(run_dir)
    assert caught.value.step == 7
    clear_failure(run_dir)
    clear_failure(run_dir)  # idempotent
    raise_recorded_failure(run_dir)


def test_nonfinite_error_keeps_its_step_through_pickling():
    error = pickle.loads(pickle.dumps(NonFiniteError("at step 3", step=3)))
    assert isinstance(error, NonFiniteError) and error.step == 3 and str(error) == "at step 3"


@pytest.mark.parametrize("error", [NonFiniteError("non-finite loss or gradients at step 5", step=5),
                                   BadDataError("too many bad samples")], ids=["nonfinite", "bad-data"])
@pytest.mark.parametrize("rank", [0, 1])
def test_train_worker_records_a_deterministic_stop_instead_of_raising(tmp_path, monkeypatch, rank, error):
    """Ray Train retries whatever the training function raises, so a deterministic stop must return on every rank.
    Without Ray: Ray Train's context is faked, the loop raises as it does on a NaN or on too much bad data."""
    pytest.importorskip("ray")
    import ray.train
    import ray.train.torch

    config = load_config("demo", [f"run.storage={tmp_path}", "model.num_classes=5"])
    context = SimpleNamespace(get_world_rank=lambda: rank, get_world_size=lambda: 2, get_local_rank=lambda: rank,
                              get_node_rank=lambda: 0)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))

    def stop(config, ctx, report, poll_drains):
        raise error

    monkeypatch.setattr(launcher, "train", stop)
    record_failure(config.run_dir, NonFiniteError("from an earlier attempt", step=2))
    launcher.train_worker(config.model_dump(mode="json"))  # returns normally on every rank
    if rank == 0:  # a fresh record replaces the stale one
        with pytest.raises(type(error), match=str(error)) as caught:
            raise_recorded_failure(config.run_dir)
        assert getattr(caught.value, "step", None) == getattr(error, "step", None)
    else:  # only rank 0 writes (the driver clears a stale record at launch)
        with pytest.raises(NonFiniteError, match="from an earlier attempt"):
            raise_recorded_failure(config.run_dir)
