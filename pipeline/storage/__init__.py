"""Storage: fsspec URLs with standard credentials, atomic writes and retries on transient errors.

Modules: `paths` (URL helpers, the S3 endpoint/region), `filesystems` (cached fsspec clients), `errors` (what a
failure means), `retries` (the project's one retry helper), `files` (the operations), `streams` (a read stream that
re-opens after a failure mid-read), `settings` (the `storage` config section). The embedded S3 server for
local runs and tests is `pipeline.storage.local_s3` (not imported here: importing storage never needs the server);
`python infra/local_s3.py` runs it in the foreground.
"""

from pipeline.storage.errors import StorageAuthError, StorageError
from pipeline.storage.files import (
    exists,
    list_dir,
    open_read,
    read_bytes,
    remove,
    require_bucket,
    upload_file,
    write_bytes,
)
from pipeline.storage.filesystems import filesystem
from pipeline.storage.paths import absolute_url, is_local_url, join_url, local_path, s3_endpoint, s3_region
from pipeline.storage.retries import outlasting_outages, retry_call, with_retries

__all__ = [
    "StorageAuthError",
    "StorageError",
    "absolute_url",
    "exists",
    "filesystem",
    "is_local_url",
    "join_url",
    "list_dir",
    "local_path",
    "open_read",
    "outlasting_outages",
    "read_bytes",
    "remove",
    "require_bucket",
    "retry_call",
    "s3_endpoint",
    "s3_region",
    "upload_file",
    "with_retries",
    "write_bytes",
]
