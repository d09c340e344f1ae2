"""Learning-rate schedule counted in samples seen, not steps, so it is independent of the global batch size.

The paper decays the JFT rate by 0.9 every 3,000,000 samples and the ImageNet rate by 0.94 every 2 epochs; both
are `base * rate ** floor(progress / every)` with progress in samples or epochs (samples / samples_per_epoch).
The schedule is a pure function of the sample counter, so resuming only needs the counter (saved in checkpoints).
"""

from __future__ import annotations

import math

from pipeline.config import Config, ScheduleConfig


class StepDecaySchedule:
    """lr(samples) = base_lr * warm-up factor * decay_rate ** floor(progress / decay_every)."""

    def __init__(self, schedule: ScheduleConfig, base_lr: float, samples_per_epoch: int | None = None) -> None:
        if schedule.unit == "epochs" and not samples_per_epoch:
            raise ValueError("schedule.unit='epochs' needs the epoch length (samples_per_epoch from data.train)")
        self.schedule = schedule
        self.base_lr = base_lr
        self.samples_per_epoch = samples_per_epoch

    def __call__(self, samples_seen: int) -> float:
        s = self.schedule
        lr = self.base_lr
        if s.warmup_samples and samples_seen < s.warmup_samples:
            lr *= samples_seen / s.warmup_samples
        if s.name == "constant":
            return lr
        progress = samples_seen / self.samples_per_epoch if s.unit == "epochs" else samples_seen
        return lr * s.decay_rate ** math.floor(progress / s.decay_every)


def build_schedule(config: Config, samples_per_epoch: int | None = None) -> StepDecaySchedule:
    return StepDecaySchedule(config.schedule, config.scaled_lr, samples_per_epoch)
