"""Checkpoints in object storage that are never read half-written.

Layout under a run directory (any fsspec URL)::

    <run>/checkpoints/step-000000123/state.pt     model, EMA, optimizer, counters (torch.load(weights_only=True))
                                     loader.json  the data-stream position (pipeline.data loader state)
                                     config.yaml  the resolved config
                                     COMMIT       written last: JSON with step, samples_seen, files, time
    <run>/checkpoints/LATEST                      name of the newest committed checkpoint (a hint for humans/tools)

A checkpoint exists only once its COMMIT marker does: readers list `step-*` directories and take the newest one
with a COMMIT, so a writer that dies mid-upload leaves garbage that is ignored and later cleaned up. Retention
deletes the COMMIT marker first, so a partly deleted checkpoint is never mistaken for a complete one.

Background saving: `save()` snapshots the state to CPU tensors synchronously (so training may mutate the live
tensors right away), then serialises and uploads in a worker thread; `wait()` joins it. At most one upload is in
flight; a second save waits for the first (bounded memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.config import Config, StorageConfig, config_to_yaml
from pipeline.storage import join_url, read_bytes, remove, upload_file, write_bytes
from pipeline.storage.checkpoints import (
    COMMIT,
    LATEST,
    CheckpointRef,
    committed_checkpoints,
    latest_checkpoint,
    step_dir_name,
    step_dirs,
)

log = logging.getLogger(__name__)


def snapshot(tree: Any) -> Any:
    """A deep copy of a state tree with every tensor detached and cloned to CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(snapshot(v) for v in tree)
    return tree


def load_checkpoint(ref: CheckpointRef, storage: StorageConfig | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{"state": train state dict, "loader": loader state or None, "commit": the COMMIT record}."""
    commit = json.loads(read_bytes(join_url(ref.url, COMMIT), storage))
    state = torch.load(io.BytesIO(read_bytes(join_url(ref.url, "state.pt"), storage)),
                       map_location=map_location, weights_only=True)
    loader_url = join_url(ref.url, "loader.json")
    loader = json.loads(read_bytes(loader_url, storage)) if "loader.json" in commit.get("files", []) else None
    return {"state": state, "loader": loader, "commit": commit}


class Checkpointer:
    """Writes a run's checkpoints (rank 0 only), applies retention, and finds the one to resume from."""

    def __init__(self, run_dir: str, config: Config, storage: StorageConfig | None = None) -> None:
        self.run_dir = run_dir
        self.config = config
        self.storage = storage
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_save_stall_s = 0.0  # time save() blocked the training loop
        self.last_upload_s = 0.0

    def save(self, step: int, state: dict[str, Any], loader_state: dict | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Publish checkpoint `step`; in the background if `checkpoint.background` (call `wait()` before exit)."""
        start = time.perf_counter()
        self.wait()
        cpu_state = snapshot(state)
        job = lambda: self._write(step, cpu_state, loader_state, extra or {})  # noqa: E731
        if self.config.checkpoint.background:
            self._thread = threading.Thread(target=self._guarded, args=(job,), name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            job()
        self.last_save_stall_s = time.perf_counter() - start

    def wait(self) -> None:
        """Block until the in-flight upload finishes; re-raise its error here, in the training loop."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint upload to {self.run_dir} failed: {error}") from error

    def _guarded(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # surfaced by wait() in the training thread
            self._error = exc

    def _write(self, step: int, state: dict, loader_state: dict | None, extra: dict) -> None:
        start = time.perf_counter()
        url = join_url(self.run_dir, "checkpoints", step_dir_name(step))
        # Through a local file in TMPDIR, not memory: the snapshot is already a full copy of the state, and a
        # serialised copy plus the upload buffer would triple the host memory a save needs. One file per run
        # directory, so that what a killed or preempted writer left behind is overwritten by the next save.
        run_id = hashlib.sha256(self.run_dir.encode()).hexdigest()[:16]
        local = os.path.join(tempfile.gettempdir(), f"xception-checkpoint-{run_id}-state.pt")
        try:
            torch.save(state, local)
            state_bytes = os.path.getsize(local)
            upload_file(local, join_url(url, "state.pt"), self.storage)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)
        files = ["state.pt", "config.yaml"]
        write_bytes(join_url(url, "config.yaml"), config_to_yaml(self.config).encode(), self.storage)
        if loader_state is not None:
            write_bytes(join_url(url, "loader.json"), json.dumps(loader_state).encode(), self.storage)
            files.append("loader.json")
        counters = state.get("counters", {})
        commit = {"step": step, "samples_seen": counters.get("samples_seen"), "files": files,
                  "time": time.time(), "state_bytes": state_bytes, **extra}
        write_bytes(join_url(url, COMMIT), json.dumps(commit).encode(), self.storage)
        write_bytes(join_url(self.run_dir, "checkpoints", LATEST), step_dir_name(step).encode(), self.storage)
        self.last_upload_s = time.perf_counter() - start
        log.info("checkpoint step %d published to %s (%.1f MB in %.1fs)", step, url, state_bytes / 1e6,
                 self.last_upload_s)
        self._apply_retention()

    def _apply_retention(self) -> None:
        keep_last, keep_every = self.config.checkpoint.keep_last, self.config.checkpoint.keep_every
        refs = committed_checkpoints(self.run_dir, self.storage)
        committed = {ref.step for ref in refs}
        for ref in step_dirs(self.run_dir, self.storage):
            # Only this writer publishes checkpoints and none is in flight now: an uncommitted directory is what
            # a crashed writer left behind.
            if ref.step not in committed:
                remove(ref.url, self.storage, recursive=True)
                log.info("removed abandoned partial checkpoint %s", ref.url)
        for ref in refs[:-keep_last]:
            if keep_every and ref.step % keep_every == 0:
                continue
            remove(join_url(ref.url, COMMIT), self.storage)  # first: from here on it is not a checkpoint
            remove(ref.url, self.storage, recursive=True)
            log.info("retention: removed %s", ref.url)

    def latest(self) -> CheckpointRef | None:
        return latest_checkpoint(self.run_dir, self.storage)
