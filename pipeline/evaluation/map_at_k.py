"""MAP@K arithmetic and its one-shot API: the Xception paper's FastEval14k MAP@100 and companions of one matrix.

Definitions (the paper's FastEval14k metric, MAP@100); `scores` and `targets` are (N images, C classes):

- Per-class orientation (default, the paper's): for class c rank all N images by score for c; rel_i = 1 if the
  image at rank i carries c. AP@K_c = sum over the top K ranks of rel_i * Precision@i, divided by
  min(K, positives_c) (``normalize="min"``, TensorFlow's ``average_precision_at_k``, YouTube-8M's ``ap_at_n``)
  or by the hits in the top K (``normalize="hits"``, what torchmetrics ``RetrievalMAP(top_k=K)`` computes; AP is 0
  when the top K holds no hit). Classes with no positive are skipped.
  MAP@K = sum_c w_c AP_c / sum_c w_c over classes with a positive; w is uniform unless given (see
  `pipeline.evaluation.class_weights`).
- Per-image orientation (``orientation="image"``): rank the C classes of each image, normalise by
  min(K, labels of the image) (or hits); images with no label are skipped; plain mean over images.

Ranking is a strict total order, so every result is deterministic: descending score, and among equal scores the
lower index first (lower image index, or image id in `MeanAveragePrecisionAtK`; lower class index in the per-image
orientation).
Scores may be logits or probabilities (sigmoid is monotonic: same ranking, same MAP) but must be finite; they are
compared in their own dtype (integer scores are compared as float64). Targets are dense multi-hot (N, C) tensors
(bool is fastest; 0/1 uint8, int or float accepted) or sparse label lists turned dense by `multi_hot`.
All functions keep tensors on the scores' device (CPU or CUDA) and return float64 AP values. The streaming
metric (`pipeline.evaluation.map_metric.MeanAveragePrecisionAtK`) shares the input checks and AP arithmetic defined
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline.evaluation.top_k import count_true, top_k_positions, top_k_set

Orientation = Literal["class", "image"]
Normalize = Literal["min", "hits"]
Labels = Sequence[Sequence[int]] | Sequence[Tensor]

__all__ = [
    "MapAtKResult",
    "average_precision_at_k",
    "class_recall_at_k",
    "map_at_k",
    "multi_hot",
    "precision_at_k",
]


# ----------------------------------------------------------------------------------------------------------------
# Input checks and conversions


def multi_hot(labels: Labels, num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """Dense (len(labels), num_classes) bool targets from per-image label lists (class ids in [0, num_classes))."""
    if num_classes < 1:
        raise ValueError(f"multi_hot: num_classes must be >= 1, got {num_classes}")
    lists = [torch.as_tensor(item, dtype=torch.int64).reshape(-1) for item in labels]
    out = torch.zeros(len(lists), num_classes, dtype=torch.bool, device=device)
    if not lists:
        return out
    lengths = torch.tensor([len(item) for item in lists])
    cols = torch.cat(lists)
    if cols.numel():
        bad = (cols < 0) | (cols >= num_classes)
        if bool(bad.any()):
            first = int(bad.to(torch.uint8).argmax())
            image = int(torch.searchsorted(lengths.cumsum(0), torch.tensor(first), right=True))
            raise ValueError(f"multi_hot: label {int(cols[first])} of image {image} is outside [0, {num_classes})")
        rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
        out[rows.to(out.device), cols.to(out.device)] = True
    return out




def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(repr(c) for c in choices)}")


def check_scores(scores: Tensor, image_ids: Tensor | None = None) -> Tensor:
    """Validated 2-D floating scores; integer/bool scores become float64 (exact up to 2**53)."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"scores must be a torch.Tensor of shape (images, classes), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (images, classes), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError(f"empty evaluation set: scores have shape {tuple(scores.shape)} (no images)")
    if scores.shape[1] == 0:
        raise ValueError(f"scores have shape {tuple(scores.shape)} (no classes)")
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)
    _check_finite(scores, image_ids)
    return scores


def _check_finite(scores: Tensor, image_ids: Tensor | None) -> None:
    # One reduction instead of an (N, C) mask: NaN/Inf make the sum non-finite; only then (or on overflow) look closer.
    accumulate = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(scores.sum(dtype=accumulate))):
        return
    bad = ~torch.isfinite(scores)
    count = int(bad.sum())
    if count == 0:
        return  # the sum overflowed; every value is finite
    first = int(bad.reshape(-1).to(torch.uint8).argmax())
    row, col = divmod(first, scores.shape[1])
    where = f"image {row}" if image_ids is None else f"batch row {row} (image id {int(image_ids[row])})"
    raise ValueError(
        f"scores contain {count} non-finite values (NaN or Inf); first at {where}, class {col}: "
        f"{float(scores[row, col])}"
    )


def _check_targets(targets: Tensor, scores: Tensor) -> Tensor:
    """Validated multi-hot targets as bool (a zero-copy view for bool and uint8)."""
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match scores shape {tuple(scores.shape)} (images, classes)"
        )
    targets = targets.to(scores.device)
    if targets.dtype == torch.bool:
        return targets
    if targets.dtype == torch.uint8:
        if int(targets.max()) <= 1:
            return targets.view(torch.bool)
    elif targets.is_complex():
        raise ValueError(f"targets must be real 0/1 values, got dtype {targets.dtype}")
    bad = (targets != 0) & (targets != 1)
    count = int(bad.sum())
    if count:
        first = int(bad.reshape(-1).to(torch.uint8).argmax())
        row, col = divmod(first, targets.shape[1])
        raise ValueError(
            f"targets must be multi-hot 0/1; {count} values are not, first at image {row}, class {col}: "
            f"{targets[row, col].item()}"
        )
    return targets == 1


def check_weights(weights: Tensor | Sequence[float] | None, num_classes: int, device: torch.device) -> Tensor:
    if weights is None:
        return torch.ones(num_classes, dtype=torch.float64, device=device)
    weights = torch.as_tensor(weights).to(device=device, dtype=torch.float64)
    if weights.shape != (num_classes,):
        raise ValueError(f"weights must have shape ({num_classes},) (one per class), got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite; found NaN or Inf")
    if bool((weights < 0).any()):
        first = int((weights < 0).to(torch.uint8).argmax())
        raise ValueError(f"weights must be >= 0; class {first} has weight {float(weights[first])}")
    if not bool((weights > 0).any()):
        raise ValueError("weights are all zero: MAP would be 0/0")
    return weights


def as_targets(targets: Tensor | Labels, scores: Tensor) -> Tensor:
    """Dense bool targets from a multi-hot tensor or array, or from a list/tuple of per-image label lists."""
    if not isinstance(targets, Tensor | list | tuple):
        targets = torch.as_tensor(targets)  # e.g. a numpy multi-hot array
    if isinstance(targets, Tensor):
        return _check_targets(targets, scores)
    if len(targets) != scores.shape[0]:
        raise ValueError(f"targets has {len(targets)} label lists for {scores.shape[0]} images (rows of scores)")
    return multi_hot(targets, scores.shape[1], device=scores.device)


# ----------------------------------------------------------------------------------------------------------------
# AP arithmetic


def ranked_sums(relevant: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Relevance in rank order along `dim` -> per query (sum_i rel_i * Precision@i as float64, hits as int64).

    Sums are cumulative (sequential), so a query's value does not depend on which other queries share the call:
    streaming and one-shot results agree bit for bit.
    """
    rel = relevant.to(torch.float64)
    hits = rel.cumsum(dim)
    ranks_shape = [1, 1]
    ranks_shape[dim] = -1
    ranks = torch.arange(1, rel.shape[dim] + 1, dtype=torch.float64, device=rel.device).view(ranks_shape)
    numerator = (rel * hits / ranks).cumsum(dim).select(dim, -1)
    return numerator, hits.select(dim, -1).to(torch.int64)


def finish_ap(numerator: Tensor, hits: Tensor, positives: Tensor, k: int, normalize: str) -> tuple[Tensor, Tensor]:
    valid = positives > 0
    denominator = positives.clamp(max=k) if normalize == "min" else hits
    ap = numerator / denominator.clamp(min=1).to(torch.float64)  # numerator is 0 when there is no hit
    return torch.where(valid, ap, 0.0), valid


def weighted_mean(values: Tensor, valid: Tensor, weights: Tensor, what: str) -> float:
    if not bool(valid.any()):
        raise ValueError(f"no {what} has a positive label: MAP@K is undefined")
    w = torch.where(valid, weights, 0.0)
    total = w.sum()
    if float(total) == 0:
        raise ValueError(f"every {what} with a positive label has weight 0: the weighted mean is 0/0")
    return float((values * w).sum() / total)


# ----------------------------------------------------------------------------------------------------------------
# One-shot metrics


def average_precision_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100, orientation: Orientation = "class",
                           normalize: Normalize = "min") -> tuple[Tensor, Tensor]:
    """AP@K of every class (orientation "class": shape (C,)) or image ("image": shape (N,)), with a validity mask.

    Returns (ap float64, valid bool): valid is False for classes/images without a positive label, whose AP is 0
    and must not be averaged. scores (N, C) logits or probabilities; targets (N, C) multi-hot or N label lists.
    """
    k = check_k(k)
    check_choice("orientation", orientation, ("class", "image"))
    check_choice("normalize", normalize, ("min", "hits"))
    scores = check_scores(scores)
    targets = as_targets(targets, scores)
    dim = 1 if orientation == "image" else 0
    relevant = targets.gather(dim, top_k_positions(scores, k, dim))
    numerator, hits = ranked_sums(relevant, dim)
    return finish_ap(numerator, hits, count_true(targets, dim), k, normalize)


def map_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100, weights: Tensor | Sequence[float] | None = None,
             orientation: Orientation = "class", normalize: Normalize = "min") -> float:
    """MAP@K (the paper's MAP@100 with the defaults): weighted mean of `average_precision_at_k` over valid queries.

    weights (C,) non-negative per-class weights (uniform if None); only for orientation "class", since the
    per-image orientation averages images uniformly.
    """
    if orientation == "image" and weights is not None:
        raise ValueError("weights are per class; orientation='image' averages images uniformly (pass weights=None)")
    ap, valid = average_precision_at_k(scores, targets, k, orientation, normalize)
    what = "image" if orientation == "image" else "class"
    return weighted_mean(ap, valid, check_weights(weights, ap.shape[0], ap.device), what)


def precision_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 1) -> float:
    """Mean over images with a label of (labels among the image's top min(k, C) classes) / min(k, C)."""
    k = check_k(k)
    scores = check_scores(scores)
    targets = as_targets(targets, scores)
    k = min(k, scores.shape[1])
    relevant = targets.gather(1, top_k_set(scores, k, dim=1)[0])
    hits = count_true(relevant, dim=1).to(torch.float64) / k
    valid = count_true(targets, dim=1) > 0
    return weighted_mean(hits, valid, torch.ones_like(hits), "image")


def class_recall_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100,
                      weights: Tensor | Sequence[float] | None = None) -> float:
    """Weighted mean over classes with a positive of (positives among the class's top K images) / positives."""
    k = check_k(k)
    scores = check_scores(scores)
    targets = as_targets(targets, scores)
    hits = count_true(targets.gather(0, top_k_set(scores, k, dim=0)[0]), dim=0)
    positives = count_true(targets, dim=0)
    recall = hits.to(torch.float64) / positives.clamp(min=1)
    return weighted_mean(recall, positives > 0, check_weights(weights, scores.shape[1], scores.device), "class")


@dataclass(frozen=True)
class MapAtKResult:
    """Everything `MeanAveragePrecisionAtK.result` / `evaluate_map_at_k` report. Vectors are float64/int64/bool on
    the scores' device.

    Per-class vectors have shape (C,), per-image vectors (N,) in ascending image-id order; entries whose mask
    (`class_valid`, `image_valid`) is False hold 0 and are excluded from every mean.
    """

    k: int
    normalize: str
    map_at_k: float  # per-class orientation, weighted: the paper's MAP@100
    image_map_at_k: float  # per-image orientation, plain mean over images with a label
    class_recall_at_k: float  # weighted mean over classes of positives in the top K / positives
    precision_at_1: float  # mean over images with a label
    precision_at_5: float
    per_class_ap: Tensor
    per_class_recall: Tensor
    class_positives: Tensor
    class_valid: Tensor
    image_ids: Tensor
    per_image_ap: Tensor
    image_valid: Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_ids.numel())

    def scalars(self) -> dict[str, float]:
        """Flat name -> number view for logging (names carry K)."""
        k = self.k
        return {
            f"map@{k}": self.map_at_k,
            f"image_map@{k}": self.image_map_at_k,
            f"class_recall@{k}": self.class_recall_at_k,
            "precision@1": self.precision_at_1,
            "precision@5": self.precision_at_5,
            "num_images": float(self.num_images),
            "num_classes_with_positives": float(self.class_valid.sum()),
            "num_images_with_labels": float(self.image_valid.sum()),
        }
