"""Shared pytest fixtures. Keep each fixture generic and documented; add new ones below the existing ones."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before torch is first imported (conftest loads before the test modules): OpenMP threads that wait for work sleep
# instead of spinning, here and in every process the tests start (Ray workers, loader workers, jobs), which
# inherit it. Tests run several processes on 2 cores; spinning threads took the cores the others needed (measured
# in tests/benchmarks/learning.py: a demo step 1.6 s instead of 7.6 s beside another busy process).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray Train's controller polls its workers every 2 s by default; the tests' runs are seconds long, so each restart,
# failure and finish waited up to a poll for nothing (the SIGTERM test of test_distributed: 61 s -> 46 s at 0.5 s).
# Only when it is noticed changes, not what happens; the fault figures in the docs were measured at Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The time Ray Train waits for a worker group's placement (not its start-up: the processes start after it). After a
# node is removed, its controller may still count the node for up to 20 s and ask for a group that cannot be placed;
# Ray's 60 s (meant for an autoscaler bringing nodes up) then took 60 of test_elastic's 110 s. Placement on the
# tests' cluster, with room, takes well under a second; a timed-out placement is retried, counting no failure.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
# Ctrl-C as a terminal gives it, however the suite was started: a shell starts what it runs in the background with
# SIGINT ignored, children inherit that, and Python then leaves it ignored (a CI run started with `&` trained on
# through the SIGINT of test_side_uploads). A Python handler here is reset to the default in every process the tests
# start, so Python there raises KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


@pytest.fixture(scope="session")
def _restartable_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    with LocalS3(tmp_path_factory.mktemp("restartable-s3"), buckets=["restart"]) as server:
        yield server


@pytest.fixture
def restartable_s3(_restartable_server: LocalS3,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalS3, StorageConfig]]:
    """An S3 server of its own (bucket "restart", apart from `local_s3`) that the test may stop, pause and start
    again, with storage options that retry long enough (10 attempts, 0.25 s backoff) to ride out a restart of a
    second or two. One server serves every such test (a start and stop cost ~3.5 s): each gets it running and
    answering, whatever the test before left it as."""
    from pipeline.storage import filesystem

    server = _restartable_server
    server.resume()  # a no-op unless a test left it paused
    server.start()  # a no-op if running
    for name in _AWS_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    storage = server.storage_config().model_copy(update={"retries": 10, "retry_backoff_s": 0.25})
    fs, bucket = filesystem("s3://restart", storage)
    fs.invalidate_cache()
    if left := fs.find(bucket):  # an empty bucket, as a server of its own had
        fs.rm(left)
    yield server, storage


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


# ------------------------------------------------------------------------------------------ the shared Ray cluster


class _SharedRayCluster:
    """The `ray_cluster` fixture's cluster: started by its first test, kept for the next ones, shut down after the
    last one that asks for it (`pytest_runtest_teardown` below), since each start and stop of a 3-node cluster
    costs ~15 s on 2 cores. Between tests it is put back as it was: nodes a test removed are added back, and a
    test that failed (and may have left a node draining, frozen or gone) gets a new cluster for the next one."""

    WORKER_NODES = 2

    def __init__(self) -> None:
        self.cluster = None
        self.temp: str | None = None
        self.saved_tmpdir: str | None = None

    def acquire(self):
        """The cluster, healthy, with this process connected to it."""
        import ray
        from ray.cluster_utils import Cluster

        if self.cluster is None:
            # Its own RAY_TMPDIR (short: Ray's socket paths live under it): Ray Train's helper actors otherwise
            # connect to the newest Ray instance on the machine. Workers and nodes started later inherit it.
            self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            self.saved_tmpdir = os.environ.get("RAY_TMPDIR")
            os.environ["RAY_TMPDIR"] = self.temp
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        while len(self.cluster.worker_nodes) < self.WORKER_NODES:
            self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        if not ray.is_initialized():
            ray.init(address=self.cluster.address)
        return self.cluster

    def after_test(self, failed: bool, keep_connected: bool, needed_later: bool) -> None:
        """Undo what the test did to the cluster: a new one after a failure or a lost process (a node frozen,
        drained or killed without `remove_node`), else only nodes added back (by `acquire`) or extra ones removed."""
        import ray

        if self.cluster is None:
            return
        if failed or not self.cluster.remaining_processes_alive():
            self.shutdown()
        else:
            while len(self.cluster.worker_nodes) > self.WORKER_NODES:
                self.cluster.remove_node(next(iter(self.cluster.worker_nodes)))
            if not keep_connected:
                ray.shutdown()  # the next test may start a Ray of its own
            if not needed_later:
                self.shutdown()

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        if self.temp is not None:
            if self.saved_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self.saved_tmpdir
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None


_RAY_CLUSTER = _SharedRayCluster()


@pytest.fixture
def ray_cluster(local_s3: LocalS3):
    """A `ray.cluster_utils.Cluster` of a head without CPUs (Ray Train's controller, no training worker) and two
    1-CPU worker nodes, this process connected to it, shared by the tests that ask for it (see _SharedRayCluster).
    A test may add, remove or drain nodes; it gets back exactly two worker nodes at its start. Started after the
    session's local S3 server, so its processes inherit the S3 settings."""
    pytest.importorskip("ray")
    return _RAY_CLUSTER.acquire()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield  # the test's own fixtures are torn down by now
    if "ray_cluster" in item.fixturenames:
        later = item.session.items[item.session.items.index(item) + 1:]
        _RAY_CLUSTER.after_test(failed=item.stash.get(_FAILED, False),
                                keep_connected=nextitem is not None and "ray_cluster" in nextitem.fixturenames,
                                needed_later=any("ray_cluster" in other.fixturenames for other in later))
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    _RAY_CLUSTER.shutdown()
