"""Shared pytest fixtures. Keep each fixture generic and documented; add new ones below the existing ones."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

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
