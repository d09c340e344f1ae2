"""Storage: fsspec URLs with standard credentials, atomic writes and retries on transient errors.

The embedded S3 server for local runs and tests lives in `pipeline.storage.local_s3` (not imported here, so that
`python -m pipeline.storage.local_s3` runs cleanly and importing storage never needs the server).
"""

from pipeline.storage.urls import (
    StorageAuthError,
    StorageError,
    absolute_url,
    exists,
    filesystem,
    is_local_url,
    join_url,
    list_dir,
    local_path,
    open_read,
    read_bytes,
    remove,
    s3_endpoint,
    s3_region,
    upload_file,
    with_retries,
    write_bytes,
)

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
    "read_bytes",
    "remove",
    "s3_endpoint",
    "s3_region",
    "upload_file",
    "with_retries",
    "write_bytes",
]
