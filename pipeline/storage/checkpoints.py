"""The checkpoint directory layout that training writes and the evaluator reads (no torch here).

    <run>/checkpoints/step-000000123/...   files of one checkpoint
    <run>/checkpoints/step-000000123/COMMIT  written last: the checkpoint exists only once this does
    <run>/checkpoints/LATEST                 name of the newest committed checkpoint (a hint for people and tools)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.config import StorageConfig
from pipeline.storage.files import exists, list_dir
from pipeline.storage.paths import join_url

COMMIT = "COMMIT"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


@dataclass(frozen=True)
class CheckpointRef:
    url: str
    step: int


def step_dirs(run_dir: str, storage: StorageConfig | None = None) -> list[CheckpointRef]:
    """Every `step-*` directory, complete or not, oldest first."""
    refs = []
    for url in list_dir(join_url(run_dir, "checkpoints"), storage):
        match = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
        if match:
            refs.append(CheckpointRef(url=url.rstrip("/"), step=int(match.group(1))))
    return sorted(refs, key=lambda r: r.step)


def committed_checkpoints(run_dir: str, storage: StorageConfig | None = None) -> list[CheckpointRef]:
    """Every complete checkpoint of a run (its COMMIT marker exists), oldest first."""
    return [ref for ref in step_dirs(run_dir, storage) if exists(join_url(ref.url, COMMIT), storage)]


def is_checkpoint_step(step: int, every_steps: int, total_steps: int) -> bool:
    """Whether training publishes a checkpoint after `step`: every `every_steps`, and at the last step."""
    return step % every_steps == 0 or step == total_steps


def scheduled_steps(every_steps: int, total_steps: int, until: int) -> list[int]:
    """The steps up to `until` at which training publishes a checkpoint: those `is_checkpoint_step` accepts."""
    steps = list(range(every_steps, min(until, total_steps) + 1, every_steps))
    if total_steps <= until and total_steps % every_steps:
        steps.append(total_steps)
    return steps


def latest_checkpoint(run_dir: str, storage: StorageConfig | None = None) -> CheckpointRef | None:
    refs = committed_checkpoints(run_dir, storage)
    return refs[-1] if refs else None
