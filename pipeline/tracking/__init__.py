"""Experiment tracking: one tracked run (MLflow or Weights & Biases) per run directory, fed by training and evaluation.

`start_tracking(run_dir, config, role=...)` returns a `Tracker` (`tracking.backend=none`: one that does nothing).
Training's rank 0 logs its config and scalars, the evaluator its MAP@K metrics and `report.html`, into the same
tracked run: its id is kept in `<run>/tracking.json` (`run_file`), so a resumed training and a restarted evaluator
continue it. Modules: `tracker` (the interface, the background sender, the run-id file), `mlflow_backend`,
`wandb_backend` (imported only when chosen, here: neither package is a core dependency; the backends import
`tracker`, never the other way). This package imports only `pipeline.config`, `pipeline.storage` and
`pipeline.background`; `pipeline.train` and `pipeline.evaluation` import it.
"""

from __future__ import annotations

from typing import Literal

from pipeline.config import Config, TrackingConfig
from pipeline.tracking.tracker import (
    TRACKING_FILE,
    Backend,
    BackgroundTracker,
    Tracker,
    flat_config,
    metric_name,
    read_run_file,
)

Role = Literal["train", "eval"]
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


class TrackingUnavailable(ValueError):
    """The chosen tracking backend's package is not installed (a refused input: the job exits with code 2)."""


def require_backend(settings: TrackingConfig) -> None:
    """Refuse a backend whose package is missing (TrackingUnavailable), before anything starts."""
    if settings.backend == "none":
        return
    package = _PACKAGES[settings.backend]
    try:
        __import__(package)
    except ImportError as exc:
        raise TrackingUnavailable(f"tracking.backend={settings.backend} needs the {package} package: "
                                  f"pip install -e '.[tracking]' (or set tracking.backend=none)") from exc


def start_tracking(run_dir: str, config: Config, *, role: Role) -> Tracker:
    """The tracker of `run_dir` as `config.tracking` says: training (`role="train"`, rank 0 only) owns the tracked
    run's status, the evaluator (`"eval"`) only adds to it. Returns at once; the run is opened in the background."""
    settings = config.tracking
    if settings.backend == "none":
        return Tracker()
    require_backend(settings)
    run_name = settings.run_name or config.run.name
    if settings.backend == "mlflow":
        from pipeline.tracking.mlflow_backend import MlflowBackend

        backend: Backend = MlflowBackend(settings, run_name, run_dir, primary=role == "train")
    else:
        from pipeline.tracking.wandb_backend import WandbBackend

        backend = WandbBackend(settings, run_name, run_dir, primary=role == "train")
    return BackgroundTracker(backend, settings.backend, run_dir, config.storage, settings.close_timeout_s)


__all__ = [
    "TRACKING_FILE",
    "Tracker",
    "TrackingUnavailable",
    "flat_config",
    "metric_name",
    "read_run_file",
    "require_backend",
    "start_tracking",
]
