"""The MLflow backend: one MLflow run per run directory, through `MlflowClient` (no global active run).

The tracked run lives in the experiment `tracking.project` on the server `tracking.uri` (None: MLflow's own
resolution, MLFLOW_TRACKING_URI first). Its id goes into `<run>/tracking.json`; a run id the server does not know
(another server, a deleted run) is replaced by a new run, with a warning. Metrics are logged at the training step.
Params are the flattened config; MLflow never changes a param once logged, so when a resumed run's config differs
(`train.total_steps=1200` to train further), the new values are recorded as tags `config.<key>`. The run is
tagged `run_dir` with the run directory. Training (the primary) marks the run RUNNING when it starts or resumes and
FINISHED or FAILED when it ends; the evaluator leaves the status alone.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.tracker import flat_config

log = logging.getLogger(__name__)

_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class MlflowBackend:
    """See the module doc; every method runs on the tracker's sender thread."""

    def __init__(self, settings: TrackingConfig, run_name: str, run_dir: str, *, primary: bool) -> None:
        self.settings, self.run_name, self.run_dir, self.primary = settings, run_name, run_dir, primary
        self.client = MlflowClient(tracking_uri=settings.uri)
        self.run_id = ""

    def open(self, known: dict[str, Any] | None) -> dict[str, Any]:
        if known is not None and self._resume(known["run_id"]):
            return known
        experiment_id = self._experiment_id()
        tags = {**self.settings.tags, "run_dir": self.run_dir}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        return {"run_id": self.run_id, "experiment_id": experiment_id}

    def _resume(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code not in _MISSING:
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s (from %s/tracking.json) is not on %s or was deleted: starting a new tracked "
                        "run", run_id, self.run_dir, self.client.tracking_uri)
            return False
        self.run_id = run_id
        if self.primary and run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return True

    def _experiment_id(self) -> str:
        name = self.settings.project
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException as exc:  # created by another process meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise exc from None
            return experiment.experiment_id

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def log_config(self, config: dict[str, Any]) -> None:
        logged = self.client.get_run(self.run_id).data.params
        params, changed = [], []
        for key, value in flat_config(config).items():
            if key not in logged:
                params.append(Param(key, value))
            elif logged[key] != value:
                changed.append(RunTag(f"config.{key}", value))
        if changed:
            log.info("MLflow run %s: %d config value(s) differ from its params, recorded as config.* tags: %s",
                     self.run_id, len(changed), ", ".join(tag.key[len("config."):] for tag in changed))
        self.client.log_batch(self.run_id, params=params, tags=changed)

    def log_file(self, path: str, name: str) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=os.path.dirname(name) or None)

    def close(self, failed: bool) -> None:
        if self.primary:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
