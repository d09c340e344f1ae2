"""Per-class decision thresholds: which labels an image has, not only a ranking; their file format, in one place.

A multi-label model scores every class; a user asks "which labels does this image have". Each class gets the
probability threshold (on sigmoid(logit)) that maximised F1 on the evaluation set; classes with too few positives
there to estimate one get the global threshold (the one that maximises F1 over all classes' decisions pooled).
The evaluator computes them per checkpoint; export copies them into the model package; prediction applies them.

File (JSON, `thresholds.json`-like; written with `write_thresholds`, read with `read_thresholds`)::

    {"format": "xception-pipeline-thresholds", "version": 1, "step": 600, "method": "max_f1",
     "min_positives": 5, "global_threshold": 0.31, "classes": ["cat", ...], "thresholds": [0.42, ...],
     "positives": [17, ...], "f1": [0.8, ...], "held_out_f1": [0.74, ...]}

`thresholds[c]` is the threshold class `c` uses (already the global one where `positives[c] < min_positives`);
`f1[c]` is the eval-set F1 at it, in-sample (on the images it was fitted on, so optimistic); `held_out_f1[c]` is
the F1 of thresholds fitted on one half of the eval images and scored on the other
(`pipeline.evaluation.threshold_fit`), the estimate of what it does on new images (files written before it was
recorded have none).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from pipeline.checkpoint.format import step_dir_name
from pipeline.config import StorageConfig
from pipeline.storage import join_url, read_bytes, write_bytes

FORMAT = "xception-pipeline-thresholds"
VERSION = 1


class ThresholdsError(ValueError):
    """A thresholds file that cannot be used: wrong format or version, or lengths that disagree."""


@dataclass(frozen=True)
class ClassThresholds:
    """One threshold per class (probabilities in [0, 1]), and how they were chosen."""

    classes: list[str]
    thresholds: list[float]
    global_threshold: float
    min_positives: int
    step: int | None = None
    method: str = "max_f1"
    positives: list[int] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)  # in-sample
    held_out_f1: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.classes)
        lists = (self.positives, self.f1, self.held_out_f1)
        if len(self.thresholds) != n or any(len(v) not in (0, n) for v in lists):
            raise ThresholdsError(f"{n} classes but {len(self.thresholds)} thresholds, {len(self.positives)} "
                                  f"positive counts, {len(self.f1)} F1 values and {len(self.held_out_f1)} held-out "
                                  "F1 values")
        bad = [v for v in [*self.thresholds, self.global_threshold] if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
        if bad:
            raise ThresholdsError(f"thresholds are probabilities in [0, 1]; got {bad[:3]}")

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(N, C) probabilities -> (N, C) bool: the labels each image has (probability >= its class's threshold)."""
        if probabilities.shape[-1] != len(self.thresholds):
            raise ThresholdsError(f"scores for {probabilities.shape[-1]} classes, thresholds for "
                                  f"{len(self.thresholds)}")
        limits = torch.tensor(self.thresholds, dtype=probabilities.dtype, device=probabilities.device)
        return probabilities >= limits

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str, source: str = "thresholds") -> ClassThresholds:
        raw = json.loads(text)
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ThresholdsError(f"{source}: not a thresholds file of format {FORMAT} version {VERSION} "
                                  f"(format={raw.get('format')!r}, version={raw.get('version')!r})")
        fields = {k: v for k, v in raw.items() if k not in ("format", "version")}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ThresholdsError(f"{source}: {exc}") from None


def write_thresholds(url: str, thresholds: ClassThresholds, storage: StorageConfig | None = None) -> None:
    write_bytes(url, thresholds.to_json().encode("utf-8"), storage)


def read_thresholds(url: str, storage: StorageConfig | None = None) -> ClassThresholds:
    return ClassThresholds.from_json(read_bytes(url, storage).decode("utf-8"), source=url)


def thresholds_url(run_dir: str, step: int) -> str:
    """Where the evaluator writes the thresholds of checkpoint `step`: <run>/reports/thresholds/step-NNNNNNNNN.json."""
    return join_url(run_dir, "reports", "thresholds", f"{step_dir_name(step)}.json")
