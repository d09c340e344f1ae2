"""Checkpoints: the format (`format`: names, writes, publishes and reads a checkpoint's files; the save cadence) and
the trainer's `Checkpointer` (`checkpointer`: when to save, background upload, retention, restore).

One weight loader, one policy for missing EMA weights. `read_weights(url, weights)` is how the evaluator,
prediction, export and `model.init_from` take model weights out of a checkpoint: the Polyak-averaged (EMA) ones
by default, the raw ones on request. A run trained without EMA (train.ema_decay=null) has none, and asking for
them is refused with `MissingEmaWeights` (a ValueError: one line, exit code 2, naming the checkpoint and the
setting that asks for the raw weights), never answered with the raw weights instead. Why refuse rather than fall
back: every result records which weights it came from (the evaluator's `eval_settings`, a package's model.json,
init_from.json), so a fallback would record "ema" for raw weights, and raw weights score differently from EMA
ones; a MAP compared across runs, or a model shipped, would then be silently not what its record says. The
refusal comes before any large work (at launch for `model.init_from`, before scoring or exporting otherwise).

Sits beside models/ and data/: it imports torch, config and storage, nothing above.
"""

from pipeline.checkpoint.format import (
    CheckpointRef,
    MissingEmaWeights,
    Weights,
    checkpoint_url,
    committed_checkpoints,
    find_checkpoint,
    latest_checkpoint,
    read_checkpoint,
    read_checkpoint_config,
    read_commit,
    read_weights,
    run_dir_of,
    step_dir_name,
)

__all__ = [
    "CheckpointRef",
    "MissingEmaWeights",
    "Weights",
    "checkpoint_url",
    "committed_checkpoints",
    "find_checkpoint",
    "latest_checkpoint",
    "read_checkpoint",
    "read_checkpoint_config",
    "read_commit",
    "read_weights",
    "run_dir_of",
    "step_dir_name",
]
