"""Side uploads (TensorBoard's events) never delay training, and leave no staging directory behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipeline.config import Config, StorageConfig, load_config
from pipeline.storage import join_url, list_dir, read_bytes
from pipeline.storage.local_s3 import LocalS3
from pipeline.storage.mirror import KEPT_MARKER
from pipeline.train.scalars import ScalarWriter

MIRROR_LOGGER = "pipeline.storage.mirror"


def run_config(storage_url: str) -> Config:
    return load_config("demo", [f"run.storage={storage_url}", f"run.name=tb-{uuid.uuid4().hex[:8]}"])


def record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 0.1, "samples_per_s": 10.0, "samples_per_s_per_worker": 10.0,
            "data_wait_fraction": 0.0}


def uploaded_steps(run_dir: str, tmp_path: Path) -> list[int]:
    """The steps of the `loss` scalars in the run's uploaded TensorBoard event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for url in list_dir(join_url(run_dir, "tensorboard")):
        local = tmp_path / f"{uuid.uuid4().hex}-{url.rsplit('/', 1)[-1]}"
        local.write_bytes(read_bytes(url))
        steps += [e.step for e in EventFileLoader(str(local)).Load()
                  if any(v.tag == "loss" for v in e.summary.value)]
    return sorted(steps)


def test_the_staging_directory_is_uploaded_and_removed_on_close_after_a_failure(
    local_s3: LocalS3, tmp_path: Path
) -> None:
    config = run_config("s3://test/runs")
    writer = ScalarWriter(config.run_dir, config, enabled=True, report=None)
    staging = writer.uploads.local_dir
    assert Path(staging).name.startswith("tensorboard-") and os.path.isdir(staging)
    writer.write(record(10))
    writer.close(failed=True)  # on the way out of a failed run
    assert not os.path.exists(staging)
    assert uploaded_steps(config.run_dir, tmp_path) == [10]

    local_run = run_config(str(tmp_path / "runs"))  # a local run directory: written in place, nothing staged
    writer = ScalarWriter(local_run.run_dir, local_run, enabled=True, report=None)
    assert writer.uploads is None
    writer.write(record(10))
    writer.close()
    assert list((Path(local_run.run_dir) / "tensorboard").glob("events.*"))


@pytest.mark.slow  # a stalled and a stopped store, then a restart: ~10-20 s
def test_tensorboard_uploads_never_wait_for_an_unreachable_store(
    restartable_s3: tuple[LocalS3, StorageConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = restartable_s3
    config = run_config("s3://restart/runs")
    writer = ScalarWriter(config.run_dir, config, enabled=True, report=None)
    uploads = writer.uploads
    writer.write(record(10))
    writer.publish(10)
    assert uploads.wait(60) and uploads.failures == 0

    server.pause()  # a hung store: the upload's request waits for s3fs's 15 s read timeout
    try:
        writer.write(record(20))
        writer.publish(20)
        assert uploads.pending  # publish returned while its upload is stuck on the stalled store
    finally:
        server.resume()
    assert uploads.wait(120)

    server.stop()  # a store that refuses connections
    with caplog.at_level(logging.DEBUG, logger=MIRROR_LOGGER):
        for step in (30, 40):
            writer.write(record(step))
            writer.publish(step)
            assert not server.running  # returned before the store came back
            assert uploads.wait(60)
        assert uploads.failures == 2
        server.start()
        staging = uploads.local_dir
        writer.close()  # the final upload sends the newest events, steps 30 and 40 included
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == MIRROR_LOGGER]
    assert [level for level, _ in lines] == ["WARNING", "DEBUG", "INFO"], lines  # logged once, and the recovery
    assert "TensorBoard events: upload to s3://restart/runs/" in lines[0][1] and "kept locally" in lines[0][1]
    assert lines[2][1].endswith("again after 2 failed attempt(s)")
    assert not os.path.exists(staging)
    assert uploaded_steps(config.run_dir, tmp_path) == [10, 20, 30, 40]


# Rank 0 of a run on object storage, as a Ray worker runs it: SIGTERM is a preemption notice (the handler
# `pipeline.train.ray_backend` installs), the loop trains until it is stopped.
_TRAINER = """
import faulthandler, json, logging, signal, sys
from pipeline.config import load_config
from pipeline.train.loop import train
from pipeline.train.faults import PreemptionNotice

logging.basicConfig(level=logging.INFO)
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's view into a process that does not end
PreemptionNotice.install()
train(load_config("demo", json.loads(sys.argv[1])))
"""


def _trainer_stopped_by(sig: signal.Signals, tiny_demo, run_storage: str, tmp: Path) -> tuple[int, list[Path], str]:
    """Start `_TRAINER` with its own TMPDIR, send `sig` once it has trained a few steps with its staging directory
    open; its exit code, its staging directories before the signal, and its log."""
    overrides = ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                 "data.loader_workers=0", f"data.train={tiny_demo.train}", "data.eval=null",
                 f"model.num_classes={tiny_demo.num_classes}", "train.global_batch_size=8", "train.log_every=1",
                 "train.total_steps=100000", "checkpoint.every_steps=3", "checkpoint.background=false",
                 f"run.storage={run_storage}", f"run.name={sig.name}"]
    log = tmp / f"{sig.name}.log"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "w") as out:
        job = subprocess.Popen([sys.executable, "-c", _TRAINER, json.dumps(overrides)], env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "step 4/" not in log.read_text():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        staging = list(tmp.glob(f"tensorboard-{socket.gethostname()}-{job.pid}-*"))
        job.send_signal(sig)
        try:
            code = job.wait(timeout=60)  # it takes a few seconds
        except subprocess.TimeoutExpired:  # every thread's stack into the log, then the log into the failure
            job.send_signal(signal.SIGUSR1)
            time.sleep(2)
            stacks = log.read_text()[-12000:]
            raise AssertionError(f"{sig.name}: the process did not end within 60 s\n{stacks}") from None
    finally:
        if job.poll() is None:
            job.kill()
    return code, staging, log.read_text()


@pytest.mark.slow  # three training processes on the local S3, each signalled: ~60 s
def test_staging_directories_are_removed_however_rank_0_ends(local_s3: LocalS3, tiny_demo, tmp_path: Path) -> None:
    """A preemption notice (SIGTERM) and Ctrl-C (SIGINT) unwind the loop, which removes its staging directory; a
    killed process (kill -9: also how Ray ends a frozen worker or a group it gives up) cannot, so the next writer on
    the host removes it, leaving a live process's and a deliberately kept one alone."""
    run_storage = f"s3://test/{uuid.uuid4().hex}"
    for sig in (signal.SIGTERM, signal.SIGINT):
        code, staging, log = _trainer_stopped_by(sig, tiny_demo, run_storage, tmp_path)
        assert len(staging) == 1 and code != -signal.SIGKILL, log[-3000:]
        assert not staging[0].exists(), f"{sig.name}: {staging[0]} left behind\n{log[-3000:]}"

    code, staging, log = _trainer_stopped_by(signal.SIGKILL, tiny_demo, run_storage, tmp_path)
    assert code == -signal.SIGKILL and len(staging) == 1 and staging[0].is_dir(), log[-3000:]
    live = Path(tempfile.mkdtemp(prefix=f"tensorboard-{socket.gethostname()}-{os.getpid()}-", dir=tmp_path))
    kept = tmp_path / f"tensorboard-{socket.gethostname()}-{staging[0].name.split('-')[-2]}-kept"
    kept.mkdir()
    (kept / KEPT_MARKER).write_text("not all uploaded")
    config = run_config(run_storage)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp_path))  # the next writer on this host, with the killed one's TMPDIR
        writer = ScalarWriter(config.run_dir, config, enabled=True, report=None)
    assert not staging[0].exists() and live.is_dir() and kept.is_dir()
    writer.close()
    assert sorted(tmp_path.glob("tensorboard-*")) == sorted([live, kept])


def test_a_run_that_fails_before_its_first_step_leaves_no_staging_directory(
    local_s3: LocalS3, tiny_demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init_from weights of another width, given to the loop directly (no preflight): it raises before the first
    step, and the staging directory, opened before it, used to stay."""
    import torch

    from pipeline.models import build_model
    from pipeline.train.loop import train

    wide = load_config("demo", ["model.width_multiplier=0.5", f"model.num_classes={tiny_demo.num_classes}"])
    torch.save(build_model(wide).state_dict(), tmp_path / "wide.pth")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = load_config("demo", ["model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71",
                                  "data.loader_workers=0", f"data.train={tiny_demo.train}", "data.eval=null",
                                  f"model.num_classes={tiny_demo.num_classes}", f"run.storage=s3://test/{uuid.uuid4()}",
                                  f"model.init_from=timm:{tmp_path / 'wide.pth'}"])
    with pytest.raises(ValueError, match="has shape"):
        train(config)
    assert list(tmp_path.glob("tensorboard-*")) == []
