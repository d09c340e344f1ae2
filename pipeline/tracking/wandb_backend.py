"""The Weights & Biases backend: one W&B run per run directory, continued by id (`resume="allow"`).

`wandb.init` gets the project, entity, run name, tags (`key:value`) and base URL from `tracking.*`; the mode,
directory and API key come from W&B's own settings (WANDB_MODE, WANDB_DIR, `wandb login` or WANDB_API_KEY).
Every process opens its own `wandb.Run` object (`reinit="create_new"`), so training and evaluation in one process
do not share W&B's global run. Scalars carry the training step as the metric `step`, W&B's x-axis for every metric
(`define_metric`): W&B's own step only counts calls, so the evaluator's records of earlier checkpoints and a resumed
run's are never dropped as out of order. The config is W&B's run config (updated on resume). Files are copied
into the run's files directory and saved at once. Online, training and the evaluator write to the run together
through W&B's shared mode (training the primary process); offline, each process writes its own
`offline-run-*-<id>` directory with the same run id, which `wandb sync` uploads into that one run.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import wandb

from pipeline.config import TrackingConfig

STEP = "step"


class WandbBackend:
    """See the module doc; every method runs on the tracker's sender thread."""

    def __init__(self, settings: TrackingConfig, run_name: str, run_dir: str, *, primary: bool) -> None:
        self.settings, self.run_name, self.run_dir, self.primary = settings, run_name, run_dir, primary
        self.run: Any = None

    def _settings(self) -> wandb.Settings:
        options: dict[str, Any] = {"x_label": "training" if self.primary else "evaluator",
                                   "x_update_finish_state": self.primary}
        if self.settings.uri:
            options["base_url"] = self.settings.uri
        if wandb.setup().settings.mode == "online":  # W&B's resolution: WANDB_MODE, `wandb offline`, ...
            options.update(mode="shared", x_primary=self.primary)
        return wandb.Settings(**options)

    def open(self, known: dict[str, Any] | None) -> dict[str, Any]:
        tags = [f"{key}:{value}" if value else key for key, value in self.settings.tags.items()]
        self.run = wandb.init(
            project=self.settings.project, entity=self.settings.entity, name=self.run_name, tags=tags,
            id=known["run_id"] if known else None, resume="allow", reinit="create_new",
            notes=f"run directory: {self.run_dir}", settings=self._settings())
        self.run.define_metric(STEP, hidden=True)
        self.run.define_metric("*", step_metric=STEP)
        return {"run_id": self.run.id, "project": self.run.project, "entity": self.run.entity or None}

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, STEP: step})

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_file(self, path: str, name: str) -> None:
        target = os.path.join(self.run.dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
        self.run.save(target, base_path=self.run.dir, policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
