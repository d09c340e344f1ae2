"""Side uploads (TensorBoard's events) never delay training, and leave no staging directory behind."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest

from pipeline.config import Config, StorageConfig, load_config
from pipeline.storage import join_url, list_dir, read_bytes
from pipeline.storage.local_s3 import LocalS3
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
