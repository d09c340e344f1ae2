"""Training: optimizer and schedule, EMA, loss, the step, checkpoints, the per-worker loop and the Ray launcher."""
