"""Operations on objects and files at URLs: read, list, check, write atomically, upload, remove; all retried.

Contract (s3://, gs://, file://, plain paths, any fsspec protocol):
- Writes are atomic: a reader sees the old object or the new one, never a prefix of the new one.
- Transient failures are retried and logged (`pipeline.storage.retries`); permanent ones (missing object, denied,
  bad credentials) raise `StorageError` at once, naming the URL and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.errors import StorageError
from pipeline.storage.filesystems import filesystem
from pipeline.storage.paths import S3_PROTOCOLS, join_url, s3_endpoint, url_protocol
from pipeline.storage.retries import with_retries
from pipeline.storage.settings import StorageConfig
from pipeline.storage.streams import ReopeningReader

log = logging.getLogger(__name__)

_TEMP_SUFFIX = ".partial"
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(_TEMP_SUFFIX) + "$")


def _resolve(url: str, storage: StorageConfig | None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    fs, path = filesystem(url, storage)
    return fs, path, url_protocol(url)


# ------------------------------------------------------------------------------------------------------- reading


def open_read(url: str, storage: StorageConfig | None = None, *, reopen: bool = False) -> BinaryIO:
    """Open `url` for streaming reads; the caller closes it.

    Opening is retried on transient errors (a missing object fails here, not at the first read). A plain stream
    ends at a read that fails midway. With `reopen` (the data path: shards) opening rides out an outage within
    `storage.outage_budget_s`, and so does a read that fails midway: it re-opens the object at the current offset
    (`ReopeningReader`).
    """
    fs, path, protocol = _resolve(url, storage)
    handle = with_retries(lambda: fs.open(path, "rb"), what=f"open {url}", storage=storage, protocol=protocol,
                          outage=reopen)
    if reopen:
        return ReopeningReader(handle, fs, path, url, storage, protocol)  # type: ignore[return-value]
    return handle


def read_bytes(url: str, storage: StorageConfig | None = None) -> bytes:
    """The whole object at `url`, retried on transient errors."""
    fs, path, protocol = _resolve(url, storage)
    return with_retries(lambda: fs.cat_file(path), what=f"read {url}", storage=storage, protocol=protocol)


def exists(url: str, storage: StorageConfig | None = None) -> bool:
    """Whether an object or a non-empty directory/prefix exists at `url` (denied access raises, not False)."""
    fs, path, protocol = _resolve(url, storage)
    return with_retries(lambda: bool(fs.exists(path)), what=f"check {url}", storage=storage, protocol=protocol)


def list_dir(url: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URLs of the direct children of `url`, sorted, in the same spelling as `url`; [] if it is missing.

    Temporary files of in-flight local atomic writes are not listed.
    """
    fs, path, protocol = _resolve(url, storage)

    def _list() -> list[str]:
        try:
            names = fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = path.rstrip("/")
        children = {posixpath.basename(str(name).rstrip("/")) for name in names if str(name).rstrip("/") != base}
        return sorted(join_url(url, child) for child in children if child and not _TEMP_NAME.match(child))

    return with_retries(_list, what=f"list {url}", storage=storage, protocol=protocol)


# ------------------------------------------------------------------------------------------------------- writing


def _local_atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers see old or new, never partial."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}")
    try:
        # O_EXCL + mode 0o666: a fresh file with the usual umask-derived permissions (mkstemp would force 0600).
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every filesystem
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(url: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Publish `data` at `url` atomically (readers see the old object or the new one), retried on transient errors.

    Local files: temp file + os.replace. Object stores: a single PUT, or for large payloads a multipart upload,
    is atomic by the S3/GCS contract: the key appears only when the PUT or the multipart completion succeeds, so
    nothing is ever written under the final key in pieces.
    """
    fs, path, protocol = _resolve(url, storage)
    if isinstance(fs, LocalFileSystem):
        action: Callable[[], None] = lambda: _local_atomic_write(path, lambda handle: handle.write(data))  # noqa: E731
    else:
        action = lambda: fs.pipe_file(path, data)  # noqa: E731
    with_retries(action, what=f"write {url}", storage=storage, protocol=protocol)


def upload_file(local_path: str, url: str, storage: StorageConfig | None = None) -> None:
    """Copy the local file `local_path` to `url` atomically, streaming (for checkpoints and shards).

    Object stores: one PUT below s3fs's multipart threshold, a multipart upload above it; either way the key
    appears only on completion (an aborted multipart upload leaves no object).
    """
    fs, path, protocol = _resolve(url, storage)
    if isinstance(fs, LocalFileSystem):

        def action() -> None:
            with open(local_path, "rb") as source:
                _local_atomic_write(path, lambda handle: _copy(source, handle))

    else:

        def action() -> None:
            if not os.path.isfile(local_path):
                raise FileNotFoundError(errno.ENOENT, "no such local file", local_path)
            fs.put_file(local_path, path)

    with_retries(action, what=f"upload {local_path} to {url}", storage=storage, protocol=protocol)


def _copy(source: BinaryIO, target: BinaryIO, chunk: int = 8 << 20) -> None:
    while block := source.read(chunk):
        target.write(block)


def require_bucket(url: str, storage: StorageConfig | None = None) -> None:
    """Refuse an output `url` on S3 whose bucket does not exist (StorageError naming the bucket), or create it when
    `storage.create_bucket` asks to. A job checks its outputs before writing anything.

    Why: S3-compatible stores such as SeaweedFS create a bucket on the first write into it, so a typo in the bucket
    would quietly write a new bucket (AWS S3 refuses such a write, but only once the work is done). A bucket that
    exists but may not be checked (403: no s3:ListBucket) is taken as there: the writes will tell. Other protocols
    have no such trap and are not checked.
    """
    protocol = url_protocol(url)
    if protocol not in S3_PROTOCOLS:
        return
    storage = storage or StorageConfig()
    fs, path = filesystem(url, storage)
    bucket = path.split("/", 1)[0]

    def there() -> bool:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            return False
        except PermissionError:
            return True
        return True

    if with_retries(there, what=f"check bucket {bucket!r} of {url}", storage=storage, protocol=protocol):
        return
    where = s3_endpoint(storage) or "AWS"
    if not storage.create_bucket:
        raise StorageError(f"{url}: bucket {bucket!r} does not exist at {where}; check the URL for a typo, or add "
                           "storage.create_bucket=true to create it")
    with_retries(lambda: fs.mkdir(bucket), what=f"create bucket {bucket!r} at {where}", storage=storage,
                 protocol=protocol)
    fs.invalidate_cache()
    log.info("created bucket %r at %s (storage.create_bucket=true)", bucket, where)


# ------------------------------------------------------------------------------------------------------ removing


def remove(url: str, storage: StorageConfig | None = None, recursive: bool = False) -> None:
    """Delete the object (or, with recursive=True, everything under the prefix/directory) at `url`.

    A missing `url` is not an error, so clean-ups can be repeated.
    """
    fs, path, protocol = _resolve(url, storage)

    def _remove() -> None:
        folders = _s3_folders(fs, path) if recursive and protocol in S3_PROTOCOLS else []
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)
        _delete_s3_folder_entries(fs, folders)

    with_retries(_remove, what=f"remove {url}", storage=storage, protocol=protocol)


def _s3_folders(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    try:
        found = fs.find(path, withdirs=True, detail=True)
    except FileNotFoundError:
        return []
    return [name for name, info in found.items() if info.get("type") == "directory" and "/" in name]


def _delete_s3_folder_entries(fs: fsspec.AbstractFileSystem, folders: list[str]) -> None:
    """Delete the 'dir/' keys of folders just emptied, deepest first.

    SeaweedFS keeps real directory entries, listed as prefixes for ~30 s after their last object is gone, which
    makes a removed prefix look present to list_dir/exists. Deleting the 'dir/' key drops an empty one at once
    (a non-empty one is kept); on AWS S3 it deletes at most a zero-byte folder marker, so it is safe everywhere.
    """
    keys_by_bucket: dict[str, list[str]] = {}
    for folder in folders:
        bucket, key = folder.split("/", 1)
        keys_by_bucket.setdefault(bucket, []).append(key.rstrip("/") + "/")
    for bucket, keys in keys_by_bucket.items():
        keys.sort(key=lambda key: key.count("/"), reverse=True)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
