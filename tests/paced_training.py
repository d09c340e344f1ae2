"""Ray Train runs whose pace the test sets: a fault lands at a known step, whatever the machine's speed.

The real Ray Train worker (`pipeline.train.launcher.train_worker`) runs unchanged, except that a step runs only while
the steps done are below the number in a gate file. A test that waits for "a checkpoint at step 4" and then sends
a signal otherwise races the run: on a fast machine the tiny model trains its remaining steps before the signal
lands (a frozen-worker test once froze a rank that had already finished, so no peer ever waited on it).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import pytest


def _paced_train_worker(gate: str, raw_config: dict) -> None:
    import pipeline.train.loop as loop
    from pipeline.train.launcher import train_worker

    real_step = loop.train_step

    def paced(state, *args, **kwargs):
        while state.step >= int(Path(gate).read_text()):
            time.sleep(0.05)
        return real_step(state, *args, **kwargs)

    loop.train_step = paced
    train_worker(raw_config)


class Gate:
    """The number of steps a paced run may have done; every rank waits before a step beyond it."""

    def __init__(self, path: Path, steps: int) -> None:
        self.path = path
        self.allow(steps)

    def allow(self, steps: int) -> None:
        staged = self.path.with_suffix(".new")  # replaced whole: a rank reading it never sees it half written
        staged.write_text(str(steps))
        os.replace(staged, self.path)

    @property
    def steps(self) -> int:
        return int(self.path.read_text())


def paced_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, steps: int) -> Gate:
    """Make `pipeline.train.launcher.launch` start paced workers, first allowed `steps` steps."""
    import ray.cloudpickle

    from pipeline.train import launcher

    gate = Gate(tmp_path / "allowed-steps", steps)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    monkeypatch.setattr(launcher, "train_worker", functools.partial(_paced_train_worker, str(gate.path)))
    return gate
