"""The start-up every job shares: one log format, and a refused input reported as one line with exit code 2.

A job's `main(argv) -> int` is wrapped with `job_main`. Exceptions that mean "the input is wrong or unreachable"
(bad config, a dataset that does not fit the config, a missing manifest, storage that refuses or stays down after
its retries, missing demo or export packages) and the deterministic stops of training (a NaN/Inf loss, too much
corrupt data: a retry would fail the same way) end the job with `error: <Type>: <message>` on stderr and exit code
2; the traceback goes to the log at DEBUG level. Any other exception is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline.storage import StorageError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
EXIT_REFUSED = 2

log = logging.getLogger(__name__)

JobMain = Callable[[Sequence[str] | None], int]


def refused_input() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a refused input. ValueError covers ConfigError, ManifestError, ShardSplitError,
    LabelsFileError and the data-vs-config checks. Imported when needed: a job's `--help` never loads torch."""
    from pipeline.data.demo.scene import DemoAssetsMissing
    from pipeline.data.shard_writer import ShardWriteError
    from pipeline.data.stream import BadDataError
    from pipeline.models.programs import ExportPackagesMissing
    from pipeline.train.step import NonFiniteError

    return (ValueError, StorageError, DemoAssetsMissing, ShardWriteError, ExportPackagesMissing, BadDataError,
            NonFiniteError)


def refusal_line(exc: BaseException) -> str:
    """The one line a refused input prints: the exception's type (it names the kind of problem) and message."""
    return f"error: {type(exc).__name__}: {exc}"


def job_main(main: JobMain) -> JobMain:
    """Run a job's `main` with the shared logging set-up and the refused-input contract (see the module doc)."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        try:
            return main(argv)
        except Exception as exc:
            if not isinstance(exc, refused_input()):
                raise
            log.debug("refused input", exc_info=True)
            print(refusal_line(exc), file=sys.stderr)
            return EXIT_REFUSED

    return run
