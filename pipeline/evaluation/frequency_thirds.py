"""MAP@K by how common a class is: the head, middle and tail thirds of the classes by training frequency.

One MAP@K hides where it comes from: on long-tailed data (JFT's) the common classes can reach 100% AP while the
rare ones stay near chance, and a recipe that trades one for the other moves the mean little. So every evaluation
also reports MAP@K over each third of the vocabulary, ranked by training frequency (classes.tsv's
`train_frequency`, via `pipeline.evaluation.class_weights.class_prior`; ties by class id; the head third holds the
extra class or two when C is not a multiple of 3). A third's MAP@K is the mean AP of its classes that have a
positive in the evaluation set, weighted as the headline is (`eval.class_weights`); with uniform weights the
headline is the mean of the three, each weighted by its number of evaluated classes. Recorded per third:
`<third>_map@K` (None when no class of the third has an evaluation positive), `<third>_classes` and
`<third>_classes_with_positives`, and the third's training frequency range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

THIRDS = ("head", "middle", "tail")


@dataclass(frozen=True)
class FrequencyThirds:
    """Which third (0 head, 1 middle, 2 tail) each class falls in, and the frequencies that decided it."""

    third: Tensor  # (C,) int64
    frequency: Tensor  # (C,) float64

    @classmethod
    def of(cls, frequency: Tensor) -> FrequencyThirds:
        """Thirds of the classes ranked by descending `frequency` (C,), ties by class id."""
        frequency = frequency.detach().to("cpu", torch.float64)
        order = torch.argsort(-frequency, stable=True)
        third = torch.empty(frequency.numel(), dtype=torch.int64)
        for index, members in enumerate(torch.tensor_split(order, len(THIRDS))):
            third[members] = index
        return cls(third, frequency)

    def maps(self, ap: Tensor, valid: Tensor, weights: Tensor | None, k: int) -> dict[str, float | None]:
        """`<third>_map@K`: the weighted mean of `ap` (C,) over each third's `valid` classes (None: none valid)."""
        ap, valid = ap.detach().to("cpu", torch.float64), valid.detach().cpu()
        weights = torch.ones_like(ap) if weights is None else weights.detach().to("cpu", torch.float64)
        out: dict[str, float | None] = {}
        for index, name in enumerate(THIRDS):
            w = torch.where(valid & (self.third == index), weights, 0.0)
            total = float(w.sum())
            out[f"{name}_map@{k}"] = float((ap * w).sum()) / total if total > 0 else None
        return out

    def counts(self, valid: Tensor) -> dict[str, int]:
        """`<third>_classes` and `<third>_classes_with_positives` (those with an evaluation positive)."""
        valid = valid.detach().cpu()
        out = {}
        for index, name in enumerate(THIRDS):
            members = self.third == index
            out[f"{name}_classes"] = int(members.sum())
            out[f"{name}_classes_with_positives"] = int((members & valid).sum())
        return out

    def ranges(self) -> dict[str, list[float] | None]:
        """Each third's [lowest, highest] training frequency (None for an empty third: fewer than 3 classes)."""
        out: dict[str, list[float] | None] = {}
        for index, name in enumerate(THIRDS):
            values = self.frequency[self.third == index]
            out[name] = [float(values.min()), float(values.max())] if values.numel() else None
        return out

    def scalars(self, ap: Tensor, valid: Tensor, weights: Tensor | None, k: int) -> dict[str, Any]:
        """What an evaluation records: `maps`, `counts` and, under "frequency_thirds", `ranges`."""
        return {**self.maps(ap, valid, weights, k), **self.counts(valid), "frequency_thirds": self.ranges()}
