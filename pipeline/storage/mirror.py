"""A side upload that never delays its caller: a local directory's files copied to a URL by a background thread.

`DirectoryMirror` is for files a job writes locally and publishes now and then (TensorBoard's event files, which
cannot be appended to on object storage). `request()` returns at once: a `BackgroundWorker` uploads the directory's
current files, with a short retry of its own (`SIDE_RETRIES`), newest data winning (a request while an upload runs
queues one more pass, a request while one is queued adds nothing: never a queue of stale copies). While the store
is down the first failure is logged once as a WARNING, later ones at DEBUG, and the next request (or `close`) tries
again with the then newest files; a success after failures is logged once. `close(wait_s)` makes a final pass and
waits at most `wait_s` seconds for it; then it removes the local directory if it owns it and everything is
uploaded, else says where the files are and marks the directory kept (`KEPT_MARKER`).

Staging directories (`staging_directory`) carry their host and process id in their name, because a process that
is killed (kill -9, Ray ending a frozen or preempted worker, a Ctrl-C that takes the workers down) runs no cleanup:
each new one first removes those of this host whose process has ended, unless they were kept on purpose.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from pipeline.background import BackgroundWorker
from pipeline.storage.errors import StorageError
from pipeline.storage.files import upload_file
from pipeline.storage.paths import join_url
from pipeline.storage.settings import StorageConfig

log = logging.getLogger(__name__)

SIDE_RETRIES = 1  # attempts after the first per file and pass: a side upload waits for the next pass, not for the store
KEPT_MARKER = "KEPT"  # in a staging directory `close` left on purpose (its files did not all go up): not swept


def staging_directory(prefix: str) -> str:
    """A new local directory `<TMPDIR>/<prefix><host>-<pid>-<random>` for files to upload, after removing the
    ones of this host that an ended process left (`remove_orphaned_staging`)."""
    remove_orphaned_staging(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-")


def remove_orphaned_staging(prefix: str, tmp: str | None = None) -> list[str]:
    """Remove the staging directories `<tmp>/<prefix><this host>-<pid>-*` whose process has ended and that were not
    kept on purpose; returns them. Other hosts' directories (a shared temp directory) and a live process's are
    left alone; a reused pid keeps a directory until that process ends too."""
    base = os.path.join(tmp or tempfile.gettempdir(), f"{prefix}{socket.gethostname()}-")
    removed = []
    for path in glob.glob(f"{glob.escape(base)}*-*"):
        name = re.fullmatch(r"(\d+)-[^-]+", path[len(base):])  # mkdtemp's suffix has no "-": not host "<host>-2"
        if name is None or _alive(int(name[1])) or os.path.exists(os.path.join(path, KEPT_MARKER)):
            continue
        pid = name[1]
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by process %s, which ended without cleaning up", path, pid)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie or another user's process counts: leave its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class DirectoryMirror:
    """Uploads the files of `local_dir` matching `pattern` to `remote` (same names) in the background.

    `what` names it in log lines ("TensorBoard events"). `owns_dir`: `close` removes `local_dir` once all is
    uploaded (a staging directory). `pending` is True while a pass is wanted or running; `failures` counts failed
    passes since the last success.
    """

    def __init__(self, local_dir: str, remote: str, storage: StorageConfig | None, *, what: str,
                 pattern: str = "*", owns_dir: bool = False) -> None:
        self.local_dir, self.remote, self.what, self.pattern = local_dir, remote, what, pattern
        self.owns_dir = owns_dir
        self.storage = (storage or StorageConfig()).model_copy(update={"retries": SIDE_RETRIES})
        self.failures = 0
        self._passes = BackgroundWorker(f"upload {what}", max_pending=1)  # one pass queued behind the running one

    @property
    def pending(self) -> bool:
        return self._passes.unfinished > 0

    def request(self) -> None:
        """Ask for a pass over the directory's current files; returns at once (a pass already queued will read the
        newest files: nothing more is queued)."""
        self._passes.submit(self._pass, timeout_s=0)

    def wait(self, timeout_s: float) -> bool:
        """Wait until no pass is queued or running, at most `timeout_s`; True if idle."""
        return self._passes.wait(timeout_s)

    def close(self, wait_s: float) -> bool:
        """A final pass, waited for up to `wait_s` seconds; the staging directory is removed when everything is
        uploaded. True if the last pass succeeded."""
        self.request()
        idle = self._passes.close(wait_s)
        uploaded = idle and self.failures == 0
        if not idle:
            log.warning("%s: the final upload to %s did not finish within %g s; the files stay in %s", self.what,
                        self.remote, wait_s, self.local_dir)
        elif not uploaded:
            log.warning("%s: the final upload to %s failed; the files stay in %s", self.what, self.remote,
                        self.local_dir)
        elif self.owns_dir:
            shutil.rmtree(self.local_dir, ignore_errors=True)
        if not uploaded and self.owns_dir:
            with contextlib.suppress(OSError):
                Path(self.local_dir, KEPT_MARKER).write_text(f"not all uploaded to {self.remote}\n")
        return uploaded

    def _pass(self) -> None:
        try:
            for path in sorted(Path(self.local_dir).glob(self.pattern)):
                upload_file(str(path), join_url(self.remote, path.name), self.storage)
        except (StorageError, OSError) as exc:
            self.failures += 1
            (log.warning if self.failures == 1 else log.debug)(
                "%s: upload to %s failed (kept locally; the newest files go up at the next attempt): %s", self.what,
                self.remote, exc)
            return
        if self.failures:
            log.info("%s: uploaded to %s again after %d failed attempt(s)", self.what, self.remote, self.failures)
        self.failures = 0

