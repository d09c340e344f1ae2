"""Experiment tracking: one tracked run (MLflow or Weights & Biases) per run directory, fed by training and evaluation.

`start_tracking(run_dir, config, role=...)` returns a `Tracker` (`tracking.backend=none`: one that does nothing).
Training's rank 0 logs its config and scalars, the evaluator its MAP@K metrics and `report.html`, into the same
tracked run: its id is kept in `<run>/tracking.json` (`run_file`), so a resumed training and a restarted evaluator
continue it. Modules: `tracker` (the interface, the background sender, the run-id file), `mlflow_backend`,
`wandb_backend` (imported only when chosen: neither package is a core dependency). This package imports only
`pipeline.config` and `pipeline.storage`; `pipeline.train` and `pipeline.evaluation` import it.
"""

from pipeline.tracking.tracker import (
    TRACKING_FILE,
    Tracker,
    TrackingUnavailable,
    flat_config,
    metric_name,
    read_run_file,
    require_backend,
    start_tracking,
)

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
