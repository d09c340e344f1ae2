"""Run the checkpoint-watching evaluator beside training as a Ray actor, so one `ray job submit` yields reports.

The actor is named after the run (`evaluator-<run.name>`) and reused if it exists, so a resubmitted training job
does not start a second evaluator; it asks for `eval` resources only (1 CPU, or 1 GPU when `cluster.use_gpu`),
which the autoscaler can place on the evaluator node type.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Config, validate

log = logging.getLogger(__name__)


class _Evaluator:
    def __init__(self, raw_config: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = validate(raw_config)

    def run(self, until_step: int) -> int:
        from pipeline.evaluation.watcher import CheckpointWatcher

        c = self.config
        watcher = CheckpointWatcher(c.run_dir, eval_prefix=c.data.eval, weights=c.eval.weights, storage=c.storage,
                                    poll_seconds=c.eval.poll_seconds)
        return len(watcher.run(until_step=until_step))


def start_background_evaluator(config: Config) -> Any:
    """Start (or find) the run's evaluator actor and set it polling until the final step is evaluated.

    Returns the object ref of its `run` call; `ray.get` it to wait for the last report.
    """
    import ray

    if config.data.eval is None:
        raise ValueError("eval.with_training needs data.eval (the URL of the densely labelled evaluation set)")
    if not ray.is_initialized():
        ray.init(address=config.cluster.address)
    resources = {"num_gpus": 1} if config.cluster.use_gpu else {"num_cpus": 1}
    actor_class = ray.remote(**resources)(_Evaluator)
    actor = actor_class.options(name=f"evaluator-{config.run.name}", get_if_exists=True).remote(
        config.model_dump(mode="json"))
    log.info("evaluator-%s watches %s/checkpoints", config.run.name, config.run_dir)
    return actor.run.remote(config.train.total_steps)
