"""The tracker interface, and the background sender that keeps tracking off the training path.

A `Tracker` takes scalars, the config and files (`log_scalars`, `log_config`, `log_artifact`) and `close`s; the base
class does nothing (`tracking.backend=none`). `BackgroundTracker` queues every call and returns at once: one daemon
thread (a `BackgroundWorker`) opens the tracked run (resumes the id in `<run>/tracking.json`, or creates a run and
writes its id there) and sends the calls in order. A call that fails, a backend that cannot be reached, or a full
queue is warned about (the first time at once, then at most once a minute with a count) and never raised, so a
tracking server that is slow or down costs the training loop nothing. While the run cannot be opened, another
attempt is made at most every `OPEN_RETRY_S` seconds and the calls in between are dropped (counted). `close()`
waits up to `tracking.close_timeout_s` for what is queued.

Names are made valid for both backends by `metric_name` (MLflow allows letters, digits, `_ - . / : space`:
`map@100` is logged as `map_at_100`), and a config is logged flat (`flat_config`: `train.total_steps` -> `"600"`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pipeline.background import BackgroundWorker
from pipeline.config import StorageConfig
from pipeline.storage import exists, join_url, read_bytes, write_bytes

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
OPEN_RETRY_S = 60.0  # while the tracked run cannot be opened: how long until the next attempt
WARN_EVERY_S = 60.0  # repeated failures: at most one warning this often
MAX_PENDING = 1000  # queued calls; beyond this new ones are dropped (a record every train.log_every steps)



def metric_name(key: str) -> str:
    """`key` as a metric or param name every backend accepts: `@` -> `_at_`, other characters MLflow refuses -> `_`."""
    return re.sub(r"[^\w./: -]", "_", key.replace("@", "_at_"))


def flat_config(raw: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and text values (strings as they are, everything else as JSON)."""
    flat: dict[str, str] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[metric_name(name)] = value if isinstance(value, str) else json.dumps(value)
    return flat


class Backend(Protocol):
    """What a tracking service does, called from the sender thread only (blocking calls are fine there)."""

    def open(self, known: dict[str, Any] | None) -> dict[str, Any]:
        """Resume the run `known` describes (an entry of tracking.json) or create one; the entry to keep."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_file(self, path: str, name: str) -> None:
        """The local file `path` as the run's file `name` (may contain folders: `reports/report.html`)."""

    def close(self, failed: bool) -> None: ...


class Tracker:
    """Where a run's scalars, config and files go besides its own directory. This base does nothing."""

    backend = "none"

    def log_scalars(self, step: int, scalars: Mapping[str, float | int | None]) -> None:
        """Numbers at a training step (None and non-numbers are left out)."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config (a nested dict, as `Config.model_dump(mode='json')`)."""

    def log_artifact(self, source: str | bytes, name: str) -> None:
        """A file (a URL any `pipeline.storage` call reads, or its bytes) as the tracked run's file `name`."""

    def close(self, failed: bool = False) -> None:
        """Send what is queued; the training's tracker also marks the run finished (or failed)."""


class _RateLimitedWarnings:
    """The first failure is logged at once, later ones at most every `WARN_EVERY_S` with how many there were."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._unreported = 0
        self._last = -float("inf")
        self._lock = threading.Lock()  # the caller's thread (a full queue) and the sender's

    def __call__(self, message: str) -> None:
        with self._lock:
            self.count += 1
            self._unreported += 1
            now = time.monotonic()
            if now - self._last < WARN_EVERY_S:
                return
            more = f" ({self._unreported} tracking problems since the last warning)" if self._unreported > 1 else ""
            self._last, self._unreported = now, 0
        log.warning("%s: %s%s; training goes on", self.what, message, more)


class _NotOpen(Exception):
    """The tracked run is not open and the next attempt to open it is not due yet."""


class BackgroundTracker(Tracker):
    """Queues each call for one sender (a `BackgroundWorker`; see the module doc); `run_id` once the run is open."""

    def __init__(self, backend: Backend, name: str, run_dir: str, storage: StorageConfig | None,
                 close_timeout_s: float) -> None:
        self.backend = name
        self.run_dir, self.storage = run_dir, storage
        self.close_timeout_s = close_timeout_s
        self.run_id: str | None = None
        self._backend = backend
        self._warn = _RateLimitedWarnings(f"tracking ({name}) for {run_dir}")
        self._sender = BackgroundWorker(f"tracking-{name}", max_pending=MAX_PENDING)
        self._opened, self._closed = False, False
        self._next_open = 0.0

    @property
    def problems(self) -> int:
        """Calls that failed or were dropped so far."""
        return self._warn.count

    def log_scalars(self, step: int, scalars: Mapping[str, float | int | None]) -> None:
        numbers = {metric_name(k): float(v) for k, v in scalars.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:
            self._submit(f"scalars at step {step}", lambda: self._backend.log_scalars(step, numbers))

    def log_config(self, config: Mapping[str, Any]) -> None:
        snapshot = json.loads(json.dumps(config))  # a copy: the caller may change its dict afterwards
        self._submit("config", lambda: self._backend.log_config(snapshot))

    def log_artifact(self, source: str | bytes, name: str) -> None:
        self._submit(f"file {name}", lambda: self._send_file(source, name))

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.close_timeout_s
        # A full queue leaves the close call out: then the wait below times out and says so.
        self._sender.submit(self._item("close", lambda: self._backend.close(failed), needs_open=False),
                            timeout_s=self.close_timeout_s)
        if not self._sender.close(max(0.0, deadline - time.monotonic())):
            log.warning("tracking (%s): %d call(s) were still queued after tracking.close_timeout_s=%gs; giving up "
                        "on them", self.backend, self._sender.unfinished, self.close_timeout_s)

    def _item(self, what: str, call: Callable[[], None], needs_open: bool = True) -> Callable[[], None]:
        """The job for `call`: opens the run first (unless `needs_open` is False: then skipped when not open), and
        warns about a failure instead of raising it (tracking never fails the caller)."""
        def item() -> None:
            try:
                if needs_open:
                    self._ensure_open()
                elif not self._opened:
                    return  # nothing to close
                call()
            except _NotOpen:
                self._warn(f"{what} dropped: the tracked run is not open (next attempt within {OPEN_RETRY_S:.0f}s)")
            except Exception as exc:
                self._warn(f"{what} failed: {type(exc).__name__}: {exc}")

        return item

    def _submit(self, what: str, call: Callable[[], None]) -> None:
        if self._closed:
            log.warning("tracking (%s): %s after close() is ignored", self.backend, what)
            return
        if not self._sender.submit(self._item(what, call), timeout_s=0):
            self._warn(f"{what} dropped: {MAX_PENDING} calls are already waiting for the tracking service")

    def _ensure_open(self) -> None:
        if self._opened:
            return
        if time.monotonic() < self._next_open:
            raise _NotOpen
        self._next_open = time.monotonic() + OPEN_RETRY_S
        entries = read_run_file(self.run_dir, self.storage)
        known = entries.get(self.backend)
        entry = self._backend.open(known)
        if entry != known:
            write_bytes(join_url(self.run_dir, TRACKING_FILE),
                        json.dumps({**entries, self.backend: entry}, indent=2).encode(), self.storage)
        self.run_id = entry["run_id"]
        self._opened = True
        log.info("tracking (%s): %s run %s", self.backend, "continuing" if entry == known else "started",
                 self.run_id)

    def _send_file(self, source: str | bytes, name: str) -> None:
        data = source if isinstance(source, bytes) else read_bytes(source, self.storage)
        with tempfile.TemporaryDirectory(prefix="tracking-") as folder:
            path = os.path.join(folder, os.path.basename(name))
            with open(path, "wb") as file:
                file.write(data)
            self._backend.log_file(path, name)


def read_run_file(run_dir: str, storage: StorageConfig | None = None) -> dict[str, dict[str, Any]]:
    """`<run>/tracking.json`: per backend, the tracked run's entry (`run_id` and where it lives); {} if none yet."""
    url = join_url(run_dir, TRACKING_FILE)
    if not exists(url, storage):
        return {}
    try:
        entries = json.loads(read_bytes(url, storage))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not JSON ({exc}); remove it to start a new tracked run") from exc
    return entries
