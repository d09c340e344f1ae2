"""The checkpoint format: the one place that names, writes and reads a checkpoint's files.

Layout under a run directory (any fsspec URL)::

    <run>/checkpoints/step-000000123/state.pt     model, EMA, optimizer, counters, every rank's RNG state
                                     loader.json  every rank's data-stream position: {"ranks": [...]}
                                     config.yaml  the resolved config
                                     COMMIT       written last: JSON with step, samples_seen, files, time, ...
    <run>/checkpoints/LATEST                      name of the newest committed checkpoint (a hint for people and
                                                  tools; nothing reads it to decide what is published)

`COMMIT` publishes a checkpoint: it exists only once its COMMIT marker does. Readers list `step-*` directories and
take the newest one with a COMMIT, so a writer that dies mid-upload leaves garbage that is ignored (and removed by
the next writer); `delete_checkpoint` removes the COMMIT marker first, so a partly deleted checkpoint is never
mistaken for a complete one. The `Checkpointer` (`pipeline.checkpoint.checkpointer`) writes through this module;
the evaluator, prediction, export and `model.init_from` read through it; none spells a file name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import yaml

from pipeline.config import Config, StorageConfig, config_to_yaml, validate
from pipeline.storage import exists, join_url, list_dir, read_bytes, remove, upload_file, write_bytes

STATE = "state.pt"
CONFIG = "config.yaml"
LOADER = "loader.json"
COMMIT = "COMMIT"
LATEST = "LATEST"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoint_url(run_dir: str, step: int) -> str:
    """Where checkpoint `step` of a run lives (whether or not it exists)."""
    return join_url(run_dir, CHECKPOINTS, step_dir_name(step))


@dataclass(frozen=True)
class CheckpointRef:
    url: str
    step: int


def step_dirs(run_dir: str, storage: StorageConfig | None = None) -> list[CheckpointRef]:
    """Every `step-*` directory, complete or not, oldest first."""
    refs = []
    for url in list_dir(join_url(run_dir, CHECKPOINTS), storage):
        match = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
        if match:
            refs.append(CheckpointRef(url=url.rstrip("/"), step=int(match.group(1))))
    return sorted(refs, key=lambda r: r.step)


def is_committed(url: str, storage: StorageConfig | None = None) -> bool:
    """Whether the checkpoint at `url` is complete (its COMMIT marker exists)."""
    return exists(join_url(url, COMMIT), storage)


def committed_checkpoints(run_dir: str, storage: StorageConfig | None = None) -> list[CheckpointRef]:
    """Every complete checkpoint of a run, oldest first."""
    return [ref for ref in step_dirs(run_dir, storage) if is_committed(ref.url, storage)]


def latest_checkpoint(run_dir: str, storage: StorageConfig | None = None) -> CheckpointRef | None:
    refs = committed_checkpoints(run_dir, storage)
    return refs[-1] if refs else None


def find_checkpoint(url: str, storage: StorageConfig | None = None) -> CheckpointRef | None:
    """The committed checkpoint `url` names: itself when it is one (its COMMIT exists), else the newest committed
    checkpoint of the run directory `url`; None when there is neither."""
    url = url.rstrip("/")
    if is_committed(url, storage):
        match = _STEP_DIR.match(url.rsplit("/", 1)[-1])
        step = int(match.group(1)) if match else int(read_commit(url, storage)["step"])
        return CheckpointRef(url=url, step=step)
    return latest_checkpoint(url, storage)


def is_step_dir(url: str) -> bool:
    """Whether `url`'s last segment is a checkpoint directory's name (step-NNNNNNNNN), complete or not."""
    return _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1]) is not None


Weights = Literal["ema", "raw"]


class MissingEmaWeights(ValueError):
    """The EMA weights were asked for and the run kept none (train.ema_decay=null): see the package's policy."""


def pick_weights(state: dict[str, Any], weights: Weights, where: str) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint's `state`: the Polyak-averaged (EMA) or the raw ones, under the package's
    one policy: EMA asked for and none kept is refused (`MissingEmaWeights`, naming `where` and the setting)."""
    if weights == "raw":
        return state["model"]
    if state.get("ema") is None:
        raise MissingEmaWeights(f"{where} has no EMA weights (it was trained with train.ema_decay=null): ask for its "
                                "raw weights (eval.weights=raw, export.weights=raw, predict.weights=raw, "
                                "model.init_weights=raw)")
    return state["ema"]["shadow"]


def read_weights(url: str, weights: Weights = "ema", storage: StorageConfig | None = None,
                 map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The EMA or raw model weights of the checkpoint at `url` (`pick_weights`' policy): what the evaluator,
    prediction, export and `model.init_from` load."""
    return dict(pick_weights(read_checkpoint_state(url, storage, map_location), weights, url))


def is_checkpoint_step(step: int, every_steps: int, total_steps: int) -> bool:
    """Whether training publishes a checkpoint after `step`: every `every_steps`, and at the last step."""
    return step % every_steps == 0 or step == total_steps


def scheduled_steps(every_steps: int, total_steps: int, until: int) -> list[int]:
    """The steps up to `until` at which training publishes a checkpoint: those `is_checkpoint_step` accepts.

    Here beside the format because both sides need it: the trainer's `Checkpointer` saves at these steps, and the
    evaluator infers from them which checkpoints retention removed before it got to them."""
    steps = list(range(every_steps, min(until, total_steps) + 1, every_steps))
    if total_steps <= until and total_steps % every_steps:
        steps.append(total_steps)
    return steps


def write_checkpoint(run_dir: str, step: int, state: dict[str, Any], config: Config,
                     loader_state: dict | None = None, extra: dict[str, Any] | None = None,
                     storage: StorageConfig | None = None) -> dict[str, Any]:
    """Publish checkpoint `step` of `run_dir`: its files, then COMMIT, then the LATEST hint; returns the COMMIT record.

    `state` (CPU tensors) is serialised through a local file in TMPDIR, not memory: the caller's snapshot is already
    a full copy of the state, and a serialised copy plus the upload buffer would triple the host memory a save needs.
    One file per run directory, so that what a killed or preempted writer left behind is overwritten by the next save.
    """
    url = checkpoint_url(run_dir, step)
    run_id = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), f"xception-checkpoint-{run_id}-{STATE}")
    try:
        torch.save(state, local)
        state_bytes = os.path.getsize(local)
        upload_file(local, join_url(url, STATE), storage)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(local)
    files = [STATE, CONFIG]
    write_bytes(join_url(url, CONFIG), config_to_yaml(config).encode(), storage)
    if loader_state is not None:
        write_bytes(join_url(url, LOADER), json.dumps(loader_state).encode(), storage)
        files.append(LOADER)
    counters = state.get("counters", {})
    commit = {"step": step, "samples_seen": counters.get("samples_seen"), "files": files, "time": time.time(),
              "state_bytes": state_bytes, **(extra or {})}
    write_bytes(join_url(url, COMMIT), json.dumps(commit).encode(), storage)
    write_bytes(join_url(run_dir, CHECKPOINTS, LATEST), step_dir_name(step).encode(), storage)
    return commit


def delete_checkpoint(url: str, storage: StorageConfig | None = None) -> None:
    """Remove a checkpoint, its COMMIT marker first: from then on it is not a checkpoint, whatever remains."""
    remove(join_url(url, COMMIT), storage)
    remove(url, storage, recursive=True)


def read_commit(url: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The COMMIT record of the checkpoint at `url`: step, samples_seen, files, time, metrics, class_fingerprint."""
    return json.loads(read_bytes(join_url(url, COMMIT), storage))


def read_checkpoint_config(url: str, storage: StorageConfig | None = None) -> Config:
    """The resolved config saved beside the checkpoint at `url`."""
    return validate(yaml.safe_load(read_bytes(join_url(url, CONFIG), storage)))


def read_checkpoint_state(url: str, storage: StorageConfig | None = None,
                          map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict saved at `url` (`torch.load(weights_only=True)`): model, ema, optimizer, counters, rng."""
    return torch.load(io.BytesIO(read_bytes(join_url(url, STATE), storage)), map_location=map_location,
                      weights_only=True)


def read_checkpoint(url: str, storage: StorageConfig | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{"state": the state dict, "loader": the loader state or None, "commit": the COMMIT record}."""
    commit = read_commit(url, storage)
    state = read_checkpoint_state(url, storage, map_location)
    loader = json.loads(read_bytes(join_url(url, LOADER), storage)) if LOADER in commit.get("files", []) else None
    return {"state": state, "loader": loader, "commit": commit}


def run_dir_of(checkpoint_url: str) -> str:
    """The run directory of a checkpoint URL (<run>/checkpoints/step-NNNNNNNNN)."""
    parts = checkpoint_url.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parts[1] != CHECKPOINTS:
        raise ValueError(f"{checkpoint_url} is not a checkpoint URL of the form <run>/checkpoints/step-NNNNNNNNN")
    return parts[0]
