"""Learning-rate schedule counted in samples seen, not steps, so it is independent of the global batch size.

- `step` (the paper's): `base * rate ** floor(progress / every)`, progress in samples or epochs; the JFT rate
  decays by 0.9 every 3,000,000 samples, the ImageNet rate by 0.94 every 2 epochs.
- `cosine`: from `base` down to `base * final_fraction` over the run's planned samples
  (`train.total_steps * train.global_batch_size`). Tied to the run's length, so a short run ends with a small rate
  whatever its batch or dataset size; the presets for short and medium runs use it.
- `constant`.

Each is a pure function of the sample counter (plus the planned total), so resuming only needs the counter
(saved in checkpoints). A linear warm-up over `warmup_samples` multiplies any of them.
"""

from __future__ import annotations

import math

from pipeline.config import Config, ScheduleConfig


class LearningRateSchedule:
    """lr(samples) = base_lr * warm-up factor * decay factor (see the module docstring)."""

    def __init__(self, schedule: ScheduleConfig, base_lr: float, samples_per_epoch: int | None = None,
                 total_samples: int | None = None) -> None:
        if schedule.name == "step" and schedule.unit == "epochs" and not samples_per_epoch:
            raise ValueError("schedule.unit='epochs' needs the epoch length (samples_per_epoch from data.train)")
        if schedule.name == "cosine" and not total_samples:
            raise ValueError("schedule.name='cosine' needs the run's planned samples (train.total_steps x batch)")
        self.schedule = schedule
        self.base_lr = base_lr
        self.samples_per_epoch = samples_per_epoch
        self.total_samples = total_samples

    def __call__(self, samples_seen: int) -> float:
        s = self.schedule
        lr = self.base_lr
        if s.warmup_samples and samples_seen < s.warmup_samples:
            lr *= samples_seen / s.warmup_samples
        if s.name == "constant":
            return lr
        if s.name == "cosine":
            assert self.total_samples is not None
            progress = min(1.0, samples_seen / self.total_samples)
            return lr * (s.final_fraction + (1 - s.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
        progress = samples_seen / self.samples_per_epoch if s.unit == "epochs" else samples_seen
        return lr * s.decay_rate ** math.floor(progress / s.decay_every)


def build_schedule(config: Config, samples_per_epoch: int | None = None) -> LearningRateSchedule:
    return LearningRateSchedule(config.schedule, config.scaled_lr, samples_per_epoch,
                                total_samples=config.train.total_steps * config.train.global_batch_size)
