"""A local shard cache: each shard is downloaded once, later epochs read the local copy (LRU by size).

Safe with several processes (loader workers, ranks on one node) sharing one directory:
- a shard is written while it streams to its first reader (tee) into a unique temp file, and published with an
  atomic `os.replace` only when the stream was read to its end; a reader that stops early discards the temp file,
  so nothing ever reads a partial shard. Two processes fetching the same shard both publish identical bytes.
- a hit bumps the file's mtime (the LRU clock); eviction runs under an exclusive `flock` on `.lock`, deletes the
  least recently used files until the total is within `max_bytes` (a file being read stays readable after
  unlinking on POSIX).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import BinaryIO

from pipeline.config import StorageConfig
from pipeline.storage import open_read

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: eviction runs unlocked (races only evict a little early)
    fcntl = None  # type: ignore[assignment]

_TEMP_PREFIX = ".tmp-"


class ShardCache:
    """Opens shard URLs through a local directory; counts hits and misses (this process only)."""

    def __init__(self, directory: str, max_bytes: int, storage: StorageConfig | None = None,
                 opener: Callable[[str], BinaryIO] | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._opener = opener or (lambda url: open_read(url, storage))
        self.hits = 0
        self.misses = 0
        os.makedirs(directory, exist_ok=True)

    def drain_counts(self) -> tuple[int, int]:
        """(hits, misses) since the previous call."""
        counts = self.hits, self.misses
        self.hits = self.misses = 0
        return counts

    def path(self, url: str) -> str:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return os.path.join(self.directory, f"{digest}-{posixpath.basename(url.rstrip('/'))}")

    def open(self, url: str) -> BinaryIO:
        """A readable stream of the shard: the cached copy, or the remote object teed into the cache."""
        path = self.path(url)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            self.misses += 1
            temp = os.path.join(self.directory, f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
            return _Tee(self._opener(url), temp, path, self)
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)
        return handle

    def entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every published shard, least recently used first."""
        out = []
        for name in os.listdir(self.directory):
            if name.startswith(".") or name.startswith(_TEMP_PREFIX):
                continue
            path = os.path.join(self.directory, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                out.append((st.st_mtime, st.st_size, path))
        return sorted(out)

    def evict(self) -> None:
        """Delete least recently used shards until the cache holds at most `max_bytes`."""
        with open(os.path.join(self.directory, ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= size


class _Tee:
    """Reads a remote stream while copying it to `temp`; publishes `final` once the stream reached its end."""

    def __init__(self, source: BinaryIO, temp: str, final: str, cache: ShardCache) -> None:
        self._source, self._temp, self._final, self._cache = source, temp, final, cache
        self._copy: BinaryIO | None = open(temp, "wb")  # noqa: SIM115 - closed in close()/_publish()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if self._copy is not None:
            if data:
                self._copy.write(data)
            elif size != 0:
                self._publish()
        return data

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._source.tell()

    def drain(self) -> None:
        """Read the rest (tar padding after the end-of-archive marker) so the copy is complete and published."""
        while self._copy is not None and self.read(1 << 20):
            pass

    def _publish(self) -> None:
        assert self._copy is not None
        self._copy.close()
        self._copy = None
        os.replace(self._temp, self._final)
        self._cache.evict()

    def close(self) -> None:
        if self._copy is not None:  # not read to the end: never publish a partial shard
            self._copy.close()
            self._copy = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)
        self._source.close()

    def __enter__(self) -> _Tee:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
