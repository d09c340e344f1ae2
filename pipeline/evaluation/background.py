"""Run the checkpoint-watching evaluator beside training as a Ray actor, so one `ray job submit` yields reports.

The actor is named after the run (`evaluator-<run.name>`) and reused if it exists, so a resubmitted training job
does not start a second evaluator. It asks for `ray_options`: 1 CPU, 1 GPU with `cluster.use_gpu`, and the custom
`eval.resources`; on the infra/ clusters set `eval.resources={evaluator: 1}`, which only the evaluator node type
offers, or its GPU request may take a training node's GPU.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.cluster import connect_ray
from pipeline.config import Config, validate

log = logging.getLogger(__name__)


class _Evaluator:
    def __init__(self, raw_config: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = validate(raw_config)

    def run(self, until_step: int) -> int:
        from pipeline.evaluation.watcher import CheckpointWatcher

        return len(CheckpointWatcher(self.config.run_dir, self.config).run(until_step=until_step))


def start_background_evaluator(config: Config) -> Any:
    """Start (or find) the run's evaluator actor and set it polling until the final step is evaluated.

    Returns the object ref of its `run` call; `ray.get` it to wait for the last report.
    """
    import ray

    from pipeline.evaluation.evaluator import ray_options

    if config.data.eval is None:
        raise ValueError("eval.with_training needs data.eval (the URL of the densely labelled evaluation set)")
    connect_ray(config)  # the same connection (forwarded environment) that training's launch() then reuses
    actor_class = ray.remote(**ray_options(config))(_Evaluator)
    actor = actor_class.options(name=f"evaluator-{config.run.name}", get_if_exists=True).remote(
        config.model_dump(mode="json"))
    log.info("evaluator-%s watches %s/checkpoints", config.run.name, config.run_dir)
    return actor.run.remote(config.train.total_steps)
