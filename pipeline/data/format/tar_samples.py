"""Reading a shard's samples and accounting for where the reading ended: one routine for training, prediction and
indexing.

A tar's members are grouped into samples by webdataset's `group_by_keys` (the key is the member name up to the
first dot of its basename), so the loader, prediction and the indexer count the same samples. A reading ends one
of three ways (`ShardSamples.ending`): complete, truncated (an end of archive before the count the manifest
promised) or corrupt (a header or member that cannot be parsed; the samples before it were delivered). Each caller
words the ending for its own output: the loader a log line and its bad-sample counts, prediction an error row, the
indexer the manifest's list of broken shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Literal

from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.storage import StorageError

Ending = Literal["complete", "truncated", "corrupt"]
Errors = tuple[type[BaseException], ...]


def tar_members(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """The members of the tar streamed from `stream`, as webdataset's tar iterator reads them, tagged with `url`."""
    return ({**member, "__url__": url} for member in tar_file_iterator(stream))


class ShardSamples:
    """One pass over a shard's samples; afterwards `samples`, `last_key` and `error` say where and why it ended.

    An error of a kind in `broken` ends the pass: the tar is corrupt from there (`error`). Errors in `passthrough`
    propagate though they are also `broken` (by default storage errors, which the storage layer has retried
    already and which name the URL), as do all others. `finish` runs after the last sample, under the same rule
    (the shard cache publishes its copy there).
    """

    def __init__(self, members: Iterable[dict[str, Any]], *, broken: Errors = (Exception,),
                 passthrough: Errors = (StorageError,), finish: Callable[[], object] | None = None) -> None:
        self._members, self._broken, self._passthrough, self._finish = members, broken, passthrough, finish
        self.samples = 0  # samples delivered
        self.last_key: str | None = None  # the key of the last one
        self.error: BaseException | None = None  # what broke the tar, if it broke

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for sample in group_by_keys(self._members):
                self.samples += 1
                self.last_key = sample.get("__key__")
                yield sample
            if self._finish is not None:
                self._finish()
        except self._passthrough:
            raise
        except self._broken as exc:  # a truncated or corrupt tar
            self.error = exc

    def ending(self, expected: int | None = None) -> Ending:
        """How the pass ended, against the `expected` sample count (None: any count is complete)."""
        if self.error is not None:
            return "corrupt"
        if expected is not None and self.samples < expected:
            return "truncated"
        return "complete"
