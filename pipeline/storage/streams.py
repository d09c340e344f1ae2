"""A read stream that rides out an outage of the store: it re-opens its object at the current offset and reads on.

s3fs fetches a stream in blocks; a fetch that fails (a connection reset, the object store restarting or down for
minutes) would otherwise end the stream. `open_read(url, storage, reopen=True)` returns this stream instead of the
plain one; it retries within `storage.outage_budget_s` (`with_retries(outage=True)`), so an outage is a wait, logged
as one line when it starts and one when the store is back.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import BinaryIO

import fsspec

from pipeline.storage.errors import StorageError, is_storage_failure
from pipeline.storage.retries import with_retries
from pipeline.storage.settings import StorageConfig

logger = logging.getLogger(__name__)


class ReopeningReader(io.RawIOBase):
    """A read-only stream over `url` that, when a read fails with a storage error, re-opens the object, seeks to
    the bytes already delivered and reads on, with the storage retry policy for the data path (`with_retries`
    with `outage=True`: transient errors retried within `storage.outage_budget_s`). Permanent failures, and an
    outage longer than the budget, raise `StorageError` naming the URL and the offset; the bytes delivered are
    exactly the object's, in order."""

    def __init__(
        self, handle: BinaryIO, fs: fsspec.AbstractFileSystem, path: str, url: str,
        storage: StorageConfig | None, protocol: str,
    ) -> None:
        super().__init__()
        self.url, self.storage = url, storage
        self._handle: BinaryIO | None = handle
        self._fs, self._path, self._protocol = fs, path, protocol
        self._offset = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset

    def __repr__(self) -> str:  # how webdataset names the stream in a tar error
        return f"{self.url} at byte {self._offset}"

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError(f"read of closed stream {self.url}")
        size = -1 if size is None else size
        failed = None
        if self._handle is not None:
            try:
                data = self._handle.read(size)
            except Exception as exc:
                if isinstance(exc, StorageError) or not is_storage_failure(exc):
                    raise
                self._discard()
                failed = exc  # attempt 1 of the retries below: it opens the outage's one log line
            else:
                self._offset += len(data)
                return data
        data = with_retries(
            lambda: self._reopen_and_read(size),
            what=f"read {self.url} at byte {self._offset}",
            storage=self.storage,
            protocol=self._protocol,
            outage=True,
            failed=failed,
        )
        self._offset += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _reopen_and_read(self, size: int) -> bytes:
        try:
            if self._handle is None:
                self._handle = self._fs.open(self._path, "rb")
                self._handle.seek(self._offset)
            return self._handle.read(size)
        except Exception:
            self._discard()  # the next attempt re-opens
            raise

    def _discard(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()

    def close(self) -> None:
        if not self.closed:
            handle, self._handle = self._handle, None
            if handle is not None:
                handle.close()
        super().close()
