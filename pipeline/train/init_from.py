"""Start a new run from given weights (`model.init_from`): once, before the first step, never on resume.

The loop calls `initialize_from` only when the run has no checkpoint to resume from; every rank loads the same
weights (so DDP replicas agree), the EMA restarts from them, and rank 0 logs the summary and writes it into the run
directory as `init_from.json` (`pipeline.models.weights` reads the sources and applies the backbone/head rule).
"""

from __future__ import annotations

import json
import logging

from pipeline.config import Config
from pipeline.models.weights import InitSummary, load_into, read_init_weights
from pipeline.storage import join_url, write_bytes
from pipeline.train.ema import ModelEma, unwrap
from pipeline.train.step import TrainState

log = logging.getLogger(__name__)

SUMMARY = "init_from.json"


def init_summary_url(run_dir: str) -> str:
    """Where a run started from given weights records what was loaded."""
    return join_url(run_dir, SUMMARY)


def initialize_from(state: TrainState, config: Config, write_summary: bool = True) -> InitSummary | None:
    """Load `model.init_from` into a freshly built `state` (None when it is not set); the EMA restarts from it."""
    spec = config.model.init_from
    if not spec:
        return None
    source = read_init_weights(spec, config.storage, config.model.init_weights)
    model = unwrap(state.model)
    summary = load_into(model, source.state, source.source)
    if state.ema is not None:
        state.ema = ModelEma(model, state.ema.decay, state.ema.warmup)
    if write_summary:
        log.info("%s", summary.describe())
        write_bytes(init_summary_url(config.run_dir), json.dumps(summary.to_dict(), indent=1).encode(),
                    config.storage)
    return summary
