"""Shared pytest fixtures. Keep each fixture generic and documented; add new ones below the existing ones."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import StorageConfig
from pipeline.storage.local_s3 import LocalS3

# Variables that would make clients bypass the test server's endpoint or credentials.
_AWS_OVERRIDES = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A SeaweedFS S3 server on 127.0.0.1 with bucket "test", for the whole session.

    Its endpoint, keys and region are exported to os.environ for the session, so `s3://test/...` URLs work with
    `storage=None` in this process and in subprocesses (Ray workers, jobs) started from it.
    """
    with LocalS3(tmp_path_factory.mktemp("local-s3"), buckets=["test"]) as server, pytest.MonkeyPatch.context() as mp:
        for name in _AWS_OVERRIDES:
            mp.delenv(name, raising=False)
        for name, value in server.env().items():
            mp.setenv(name, value)
        yield server


@pytest.fixture
def s3_prefix(local_s3: LocalS3) -> str:
    """A fresh, empty prefix `s3://test/<uuid>` on the session's local S3 server (no trailing slash)."""
    return f"s3://test/{uuid.uuid4().hex}"


@dataclass(frozen=True)
class DemoShards:
    """A small tiny-variant demo dataset written as shards: train (sparse labels) and eval (dense labels)."""

    train: str
    eval: str
    num_classes: int


def _write_tiny_demo(root: str) -> DemoShards:
    from pipeline.config import ShardsConfig
    from pipeline.data.demo import write_demo_shards
    from pipeline.data.format import read_classes, read_manifest

    options = ShardsConfig(samples_per_shard=40, workers=1, progress=False)
    train, evaluation = f"{root}/train", f"{root}/eval"
    write_demo_shards("tiny", "train", 320, 0, train, image_size=80, options=options)
    manifest = read_manifest(train)
    write_demo_shards("tiny", "eval", 80, 1, evaluation, image_size=80, options=options,
                      vocabulary=read_classes(train, manifest))
    return DemoShards(train=train, eval=evaluation, num_classes=manifest.num_classes)


def copy_with_swapped_classes(dataset: str, target: Path) -> str:
    """A copy of the local dataset prefix `dataset` whose classes.tsv swaps the names of classes 0 and 1: the same
    shards and ids, but the ids now mean other classes."""
    shutil.copytree(dataset, target)
    lines = (target / "classes.tsv").read_text().splitlines()
    first, second = lines[1].split("\t"), lines[2].split("\t")
    first[1], second[1] = second[1], first[1]
    lines[1:3] = ["\t".join(first), "\t".join(second)]
    (target / "classes.tsv").write_text("\n".join(lines) + "\n")
    return str(target)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoShards:
    """The tiny demo dataset (320 train images in 8 shards, 80 eval images) in a local directory."""
    return _write_tiny_demo(str(tmp_path_factory.mktemp("tiny-demo")))


@pytest.fixture(scope="session")
def tiny_demo_s3(local_s3: LocalS3) -> DemoShards:
    """The same tiny demo dataset on the session's local S3 server, under s3://test/tiny-demo."""
    return _write_tiny_demo(f"s3://test/tiny-demo-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def restartable_s3(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalS3, StorageConfig]]:
    """A private S3 server (bucket "restart") that the test may stop and start again, with storage options that
    retry long enough (10 attempts, 0.25 s backoff) to ride out a restart of a second or two."""
    with LocalS3(tmp_path / "restartable-s3", buckets=["restart"]) as server:
        for name in _AWS_OVERRIDES:
            monkeypatch.delenv(name, raising=False)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server, server.storage_config().model_copy(update={"retries": 10, "retry_backoff_s": 0.25})


@contextlib.contextmanager
def restarted_after(server: LocalS3, seconds: float) -> Iterator[None]:
    """Run the body while a thread starts the (stopped) `server` again `seconds` in; a failed start is re-raised."""
    errors: list[BaseException] = []

    def restart() -> None:
        time.sleep(seconds)
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if errors:
        raise errors[0]
