"""MAP@K for multi-label classification: the Xception paper's FastEval14k MAP@100, one-shot and streaming.

Definitions (the paper's FastEval14k metric, MAP@100); `scores` and `targets` are (N images, C classes):

- Per-class orientation (default, the paper's): for class c rank all N images by score for c; rel_i = 1 if the
  image at rank i carries c. AP@K_c = sum over the top K ranks of rel_i * Precision@i, divided by
  min(K, positives_c) (``normalize="min"``, TensorFlow's ``average_precision_at_k``, YouTube-8M's ``ap_at_n``)
  or by the hits in the top K (``normalize="hits"``, what torchmetrics ``RetrievalMAP(top_k=K)`` computes; AP is 0
  when the top K holds no hit). Classes with no positive are skipped.
  MAP@K = sum_c w_c AP_c / sum_c w_c over classes with a positive; w is uniform unless given (training-set class
  frequency, or a user file read by `load_class_weights`).
- Per-image orientation (``orientation="image"``): rank the C classes of each image, normalise by
  min(K, labels of the image) (or hits); images with no label are skipped; plain mean over images.

Ranking is a strict total order, so every result is deterministic: descending score, and among equal scores the
lower index first (lower image index, or image id in `MapAtK`; lower class index in the per-image orientation).
Scores may be logits or probabilities (sigmoid is monotonic: same ranking, same MAP) but must be finite; they are
compared in their own dtype (integer scores are compared as float64). Targets are dense multi-hot (N, C) tensors
(bool is fastest; 0/1 uint8, int or float accepted) or sparse label lists turned dense by `multi_hot`.
All functions keep tensors on the scores' device (CPU or CUDA) and return float64 AP values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

Orientation = Literal["class", "image"]
Normalize = Literal["min", "hits"]
Labels = Sequence[Sequence[int]] | Sequence[Tensor]

__all__ = [
    "MapAtK",
    "MapAtKResult",
    "average_precision_at_k",
    "class_recall_at_k",
    "evaluate_map_at_k",
    "load_class_weights",
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


def load_class_weights(source: str | os.PathLike[str] | Iterable[str], num_classes: int) -> Tensor:
    """Per-class MAP weights (num_classes,) float64 from "class_id,weight" lines (a path or the lines themselves).

    Blank lines, ``#`` comments and a non-numeric header line are skipped. Every class needs exactly one
    non-negative finite weight, so a truncated or shifted file fails loudly instead of silently re-weighting MAP.
    """
    if isinstance(source, str | os.PathLike):
        name = str(source)
        lines: Iterable[str] = Path(source).read_text().splitlines()
    else:
        name, lines = "<lines>", source
    weights: list[float | None] = [None] * num_classes
    first_row = True
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2:
            raise ValueError(f"{name}:{number}: expected 'class_id,weight', got {raw!r}")
        try:
            class_id, weight = int(fields[0]), float(fields[1])
        except ValueError:
            if first_row:
                first_row = False
                continue  # header
            raise ValueError(f"{name}:{number}: expected 'class_id,weight' numbers, got {raw!r}") from None
        first_row = False
        if not 0 <= class_id < num_classes:
            raise ValueError(f"{name}:{number}: class id {class_id} is outside [0, {num_classes})")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name}:{number}: weight of class {class_id} must be finite and >= 0, got {weight}")
        if weights[class_id] is not None:
            raise ValueError(f"{name}:{number}: class {class_id} is listed twice")
        weights[class_id] = weight
    missing = [class_id for class_id, weight in enumerate(weights) if weight is None]
    if missing:
        raise ValueError(f"{name}: {len(missing)} of {num_classes} classes have no weight (first: {missing[0]})")
    return torch.tensor(weights, dtype=torch.float64)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(repr(c) for c in choices)}")


def _check_scores(scores: Tensor, image_ids: Tensor | None = None) -> Tensor:
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


def _check_weights(weights: Tensor | Sequence[float] | None, num_classes: int, device: torch.device) -> Tensor:
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


# ----------------------------------------------------------------------------------------------------------------
# Ranking: the top k positions along one dim in the strict order (value desc, position asc)
#
# dim=0 ranks the rows of each column (images for a class: the per-class orientation), dim=1 the columns of each
# row (classes for an image). Both work on the (N, C) tensor as laid out; nothing is transposed.


# Tie-break keys on demand: given query indices, the keys of those queries' entries, shaped like
# values.index_select(1 - dim, queries). Asked only for queries with ties, so ids need not be materialised.
Keys = Callable[[Tensor], Tensor]


def _key_shape(dim: int, length: int) -> list[int]:
    shape = [1, 1]
    shape[dim] = length
    return shape


def _top_k_positions(values: Tensor, k: int, dim: int) -> Tensor:
    """Positions (int64) of the top min(k, M) values along `dim` (length M), ranked by (value desc, position asc)."""
    chosen, chosen_values = _top_k_set(values, k, dim)
    order = _rank_order(chosen_values, dim, lambda queries: chosen.index_select(1 - dim, queries))
    return chosen.gather(dim, order)


def _rank_order(chosen_values: Tensor, dim: int, keys: Keys) -> Tensor:
    """Indices along `dim` that sort chosen_values by (value desc, key asc); keys(queries) are only asked for ties."""
    other = 1 - dim
    k = chosen_values.shape[dim]
    sorted_values, order = chosen_values.sort(dim=dim, descending=True)
    if k > 1:
        tied = (sorted_values.narrow(dim, 1, k - 1) == sorted_values.narrow(dim, 0, k - 1)).any(dim)
        if bool(tied.any()):
            queries = tied.nonzero().flatten()
            by_key = keys(queries).argsort(dim=dim)
            by_value = chosen_values.index_select(other, queries).gather(dim, by_key)
            by_value = by_value.sort(dim=dim, descending=True, stable=True).indices
            order.index_copy_(other, queries, by_key.gather(dim, by_value))
    return order


def _top_k_set(values: Tensor, k: int, dim: int, keys: Keys | None = None,
               prune: bool = True) -> tuple[Tensor, Tensor]:
    """Positions of the top min(k, M) values along `dim` by (value desc, key asc), in no particular order, and
    those values (a new tensor: selection has them at hand, and gathering them again is a random read).

    keys default to the position. Ranking is left to `_rank_order` because sorting k values per query costs
    more than selecting them, and the streaming state never needs an order.
    """
    other = 1 - dim
    m = values.shape[dim]
    if k >= m:
        return torch.arange(m, device=values.device).view(_key_shape(dim, m)).expand(values.shape).clone(), \
            values.clone()
    group = int(math.sqrt(m / k))  # balances ranking the unit maxima against ranking the candidates
    if prune and keys is None and group >= 4 and m // group >= 2 * (k + 1):
        return _top_k_set_pruned(values, k, dim, group)
    chosen_values, chosen = values.topk(k + 1, dim=dim, sorted=False)
    at_cut = chosen_values == chosen_values.amin(dim=dim, keepdim=True)  # the (k+1)-th value
    drop = at_cut.to(torch.uint8).argmax(dim=dim, keepdim=True)
    chosen = chosen.scatter(dim, drop, chosen.narrow(dim, k, 1)).narrow(dim, 0, k).contiguous()
    chosen_values = chosen_values.scatter(dim, drop, chosen_values.narrow(dim, k, 1)).narrow(dim, 0, k).contiguous()
    straddle = _count_true(at_cut, dim) > 1
    if bool(straddle.any()):
        # equal values at the cut: topk kept an arbitrary subset of them, so order those queries fully
        queries = straddle.nonzero().flatten()
        sub = values.index_select(other, queries)
        if keys is None:
            ranked = sub.sort(dim=dim, descending=True, stable=True).indices
        else:
            by_key = keys(queries).argsort(dim=dim)
            ranked = by_key.gather(dim, sub.gather(dim, by_key).sort(dim=dim, descending=True, stable=True).indices)
        ranked = ranked.narrow(dim, 0, k)
        chosen.index_copy_(other, queries, ranked)
        chosen_values.index_copy_(other, queries, sub.gather(dim, ranked))
    return chosen, chosen_values


def _top_k_set_pruned(values: Tensor, k: int, dim: int, group: int) -> tuple[Tensor, Tensor]:
    """`_top_k_set` that only looks inside the k+1 units (of `group` positions) with the largest maxima.

    torch.topk costs several ns per value scanned. Unit j holds positions j, j + U, j + 2U, ... (U units), so
    unit maxima are one vectorised pass; topk then scans U maxima and (k+1)*group candidates. Every value above
    the smallest kept maximum is a candidate, so a query is exact when its k-th value is above it (always, unless
    scores tie); other queries are selected again without pruning.
    """
    other = 1 - dim
    m = values.shape[dim]
    units = m // group
    body_len = units * group
    body = values.narrow(dim, 0, body_len).unflatten(dim, (group, units))
    kept_max, kept = body.amax(dim=dim).topk(k + 1, dim=dim, sorted=False)
    shape = list(body.shape)
    shape[dim + 1] = k + 1
    candidates = body.gather(dim + 1, kept.unsqueeze(dim).expand(shape)).flatten(dim, dim + 1)
    n_kept = (k + 1) * group
    if body_len < m:
        candidates = torch.cat([candidates, values.narrow(dim, body_len, m - body_len)], dim=dim)
    offsets = (torch.arange(group, device=values.device) * units).view([group, 1, 1] if dim == 0 else [1, group, 1])
    rest = torch.arange(body_len, m, device=values.device).view(_key_shape(dim, m - body_len))

    def candidate_positions(queries: Tensor) -> Tensor:
        grid = (kept.index_select(other, queries).unsqueeze(dim) + offsets).flatten(dim, dim + 1)
        rest_shape = [m - body_len, queries.numel()] if dim == 0 else [queries.numel(), m - body_len]
        return torch.cat([grid, rest.expand(rest_shape)], dim=dim)

    chosen, chosen_values = _top_k_set(candidates, k, dim, candidate_positions)
    in_body = kept.gather(dim, chosen % (k + 1)) + (chosen // (k + 1)) * units
    positions = torch.where(chosen < n_kept, in_body, chosen - n_kept + body_len)
    unsafe = chosen_values.amin(dim=dim) <= kept_max.amin(dim=dim)
    if bool(unsafe.any()):
        queries = unsafe.nonzero().flatten()
        exact, exact_values = _top_k_set(values.index_select(other, queries), k, dim, prune=False)
        positions.index_copy_(other, queries, exact)
        chosen_values.index_copy_(other, queries, exact_values)
    return positions, chosen_values


def _count_true(flags: Tensor, dim: int) -> Tensor:
    """Number of True along `dim` as int64 (uint8 partial sums of 255: far faster than bool.sum)."""
    m = flags.shape[dim]
    as_bytes = flags.view(torch.uint8)
    full = m // 255 * 255
    counts = as_bytes.narrow(dim, full, m - full).sum(dim, dtype=torch.int64)
    if full:
        partial = as_bytes.narrow(dim, 0, full).unflatten(dim, (-1, 255)).sum(dim + 1, dtype=torch.uint8)
        counts += partial.sum(dim, dtype=torch.int64)
    return counts


def _ranked_sums(relevant: Tensor, dim: int) -> tuple[Tensor, Tensor]:
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


def _finish_ap(numerator: Tensor, hits: Tensor, positives: Tensor, k: int, normalize: str) -> tuple[Tensor, Tensor]:
    valid = positives > 0
    denominator = positives.clamp(max=k) if normalize == "min" else hits
    ap = numerator / denominator.clamp(min=1).to(torch.float64)  # numerator is 0 when there is no hit
    return torch.where(valid, ap, 0.0), valid


def _weighted_mean(values: Tensor, valid: Tensor, weights: Tensor, what: str) -> float:
    if not bool(valid.any()):
        raise ValueError(f"no {what} has a positive label: MAP@K is undefined")
    w = torch.where(valid, weights, 0.0)
    total = w.sum()
    if float(total) == 0:
        raise ValueError(f"every {what} with a positive label has weight 0: the weighted mean is 0/0")
    return float((values * w).sum() / total)


def _as_targets(targets: Tensor | Labels, scores: Tensor) -> Tensor:
    """Dense bool targets from a multi-hot tensor or array, or from a list/tuple of per-image label lists."""
    if not isinstance(targets, Tensor | list | tuple):
        targets = torch.as_tensor(targets)  # e.g. a numpy multi-hot array
    if isinstance(targets, Tensor):
        return _check_targets(targets, scores)
    if len(targets) != scores.shape[0]:
        raise ValueError(f"targets has {len(targets)} label lists for {scores.shape[0]} images (rows of scores)")
    return multi_hot(targets, scores.shape[1], device=scores.device)


# ----------------------------------------------------------------------------------------------------------------
# One-shot metrics


def average_precision_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100, orientation: Orientation = "class",
                           normalize: Normalize = "min") -> tuple[Tensor, Tensor]:
    """AP@K of every class (orientation "class": shape (C,)) or image ("image": shape (N,)), with a validity mask.

    Returns (ap float64, valid bool): valid is False for classes/images without a positive label, whose AP is 0
    and must not be averaged. scores (N, C) logits or probabilities; targets (N, C) multi-hot or N label lists.
    """
    k = _check_k(k)
    _check_choice("orientation", orientation, ("class", "image"))
    _check_choice("normalize", normalize, ("min", "hits"))
    scores = _check_scores(scores)
    targets = _as_targets(targets, scores)
    dim = 1 if orientation == "image" else 0
    relevant = targets.gather(dim, _top_k_positions(scores, k, dim))
    numerator, hits = _ranked_sums(relevant, dim)
    return _finish_ap(numerator, hits, _count_true(targets, dim), k, normalize)


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
    return _weighted_mean(ap, valid, _check_weights(weights, ap.shape[0], ap.device), what)


def precision_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 1) -> float:
    """Mean over images with a label of (labels among the image's top min(k, C) classes) / min(k, C)."""
    k = _check_k(k)
    scores = _check_scores(scores)
    targets = _as_targets(targets, scores)
    k = min(k, scores.shape[1])
    relevant = targets.gather(1, _top_k_set(scores, k, dim=1)[0])
    hits = _count_true(relevant, dim=1).to(torch.float64) / k
    valid = _count_true(targets, dim=1) > 0
    return _weighted_mean(hits, valid, torch.ones_like(hits), "image")


def class_recall_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100,
                      weights: Tensor | Sequence[float] | None = None) -> float:
    """Weighted mean over classes with a positive of (positives among the class's top K images) / positives."""
    k = _check_k(k)
    scores = _check_scores(scores)
    targets = _as_targets(targets, scores)
    hits = _count_true(targets.gather(0, _top_k_set(scores, k, dim=0)[0]), dim=0)
    positives = _count_true(targets, dim=0)
    recall = hits.to(torch.float64) / positives.clamp(min=1)
    return _weighted_mean(recall, positives > 0, _check_weights(weights, scores.shape[1], scores.device), "class")


@dataclass(frozen=True)
class MapAtKResult:
    """Everything `MapAtK.compute` / `evaluate_map_at_k` report. Vectors are float64/int64/bool on the scores' device.

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


def evaluate_map_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100,
                      weights: Tensor | Sequence[float] | None = None, normalize: Normalize = "min") -> MapAtKResult:
    """MAP@K with every companion metric for one (N, C) score matrix: `MapAtK` fed in a single update."""
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (images, classes), got {getattr(scores, 'shape', type(scores).__name__)}")
    accumulator = MapAtK(scores.shape[1], k)
    accumulator.update(scores, targets)
    return accumulator.compute(weights, normalize)


# ----------------------------------------------------------------------------------------------------------------
# Streaming


_IMAGE_FIELDS = ("ids", "numerator", "hits_k", "labels", "hits_1", "hits_5")


class MapAtK:
    """Streaming MAP@K with bounded memory: feed (B, C) batches, read every metric of `MapAtKResult` at the end.

    State: per class the running top K (score, image id, relevance bit) plus positive counts, O(K*C); per image
    six numbers (its AP@K sums, label count, hits at 1/5), O(N); and a row buffer of at most `buffer_mib` MiB.
    Batches are gathered in the buffer and folded into the state a buffer at a time: selecting within many rows
    at once prunes far more than batch by batch (an evaluator's batches are small), and each fold costs a merge.
    Results equal the one-shot functions exactly, including ties (the lower image id wins). Image ids default to
    a running counter; workers that evaluate disjoint shards pass global ids (e.g. dataset indices) so that
    `merge` sees distinct ids and ranks ties as one process would.
    """

    def __init__(self, num_classes: int, k: int = 100, buffer_mib: float = 256.0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not buffer_mib > 0:
            raise ValueError(f"buffer_mib must be > 0, got {buffer_mib}")
        self.num_classes = num_classes
        self.k = _check_k(k)
        self.buffer_mib = buffer_mib
        self.reset()

    def reset(self) -> None:
        self._top_scores: Tensor | None = None  # (k', C): per class the best k' = min(k, images) so far, unordered
        self._top_ids: Tensor | None = None
        self._top_relevant: Tensor | None = None
        self._positives: Tensor | None = None  # (C,) int64
        self._max_id = -1
        self._images: dict[str, list[Tensor]] = {name: [] for name in _IMAGE_FIELDS}
        self._buffer: tuple[Tensor, Tensor, Tensor] | None = None  # (scores, targets, ids) rows not yet folded in
        self._buffered = 0

    @property
    def num_images(self) -> int:
        return sum(int(ids.numel()) for ids in self._images["ids"]) + self._buffered

    def update(self, scores: Tensor, targets: Tensor | Labels, image_ids: Tensor | Sequence[int] | None = None) -> None:
        """Add a batch: scores (B, C), targets (B, C) multi-hot or B label lists, image_ids (B,) distinct ints."""
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a 2-D (batch, classes) tensor, got {shape}")
        batch = scores.shape[0]
        if scores.shape[1] != self.num_classes:
            raise ValueError(f"scores have {scores.shape[1]} classes; this MapAtK was built for {self.num_classes}")
        if batch == 0:
            return
        held = self._top_scores if self._top_scores is not None else self._buffer[0] if self._buffer else None
        device = held.device if held is not None else scores.device  # the first batch's device, for good
        scores = scores.to(device)
        if image_ids is None:
            ids = torch.arange(self._max_id + 1, self._max_id + 1 + batch, device=device)
        else:
            ids = torch.as_tensor(image_ids, device=device)
            if ids.shape != (batch,) or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"image_ids must be {batch} integers (one per row of scores), got {ids.dtype} "
                                 f"of shape {tuple(ids.shape)}")
            ids = ids.to(torch.int64)
        scores = _check_scores(scores, ids)
        targets = _as_targets(targets, scores)
        if batch > 1 and not bool((ids[1:] > ids[:-1]).all()):
            ids, order = ids.sort()
            if bool((ids[1:] == ids[:-1]).any()):
                raise ValueError(f"image_ids repeat within the batch: {int(ids[1:][ids[1:] == ids[:-1]][0])}")
            scores, targets = scores[order], targets[order]
        self._max_id = max(self._max_id, int(ids[-1]))
        if batch >= self._buffer_rows(scores.dtype):  # as large as a full buffer: fold it in as it is
            self._flush()
            self._fold(scores, targets, ids)
            return
        start = 0
        while start < batch:
            buffer_scores, buffer_targets, buffer_ids = self._buffer_for(scores)
            take = min(batch - start, buffer_ids.shape[0] - self._buffered)
            rows = slice(self._buffered, self._buffered + take)
            buffer_scores[rows] = scores[start:start + take]
            buffer_targets[rows] = targets[start:start + take]
            buffer_ids[rows] = ids[start:start + take]
            self._buffered += take
            start += take
            if self._buffered == buffer_ids.shape[0]:
                self._flush()

    def _buffer_rows(self, dtype: torch.dtype) -> int:
        return max(1, int(self.buffer_mib * 2**20) // (self.num_classes * (dtype.itemsize + 1) + 8))

    def _buffer_for(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The row buffer, (re)allocated for scores' dtype (promoting what it holds)."""
        if self._buffer is not None and self._buffer[0].dtype != scores.dtype:
            common = torch.promote_types(scores.dtype, self._buffer[0].dtype)
            if common != self._buffer[0].dtype:
                self._flush()
                self._buffer = None
        if self._buffer is None:
            c = self.num_classes
            dtype = scores.dtype if self._top_scores is None else torch.promote_types(scores.dtype,
                                                                                       self._top_scores.dtype)
            rows = self._buffer_rows(dtype)
            self._buffer = (torch.empty(rows, c, dtype=dtype, device=scores.device),
                            torch.empty(rows, c, dtype=torch.bool, device=scores.device),
                            torch.empty(rows, dtype=torch.int64, device=scores.device))
        return self._buffer

    def _flush(self) -> None:
        """Fold the buffered rows into the per-image results and the per-class top K."""
        if self._buffer is None or self._buffered == 0:
            return
        scores, targets, ids = (part[: self._buffered] for part in self._buffer)
        self._fold(scores, targets, ids)
        self._buffered = 0

    def _fold(self, scores: Tensor, targets: Tensor, ids: Tensor) -> None:
        """Fold rows into the per-image results and the per-class top K (the tensors are not kept).

        An id repeated across batches is reported by `compute`, which sees every id."""
        if ids.shape[0] > 1 and not bool((ids[1:] > ids[:-1]).all()):  # batches came with interleaved ids
            ids, order = ids.sort(stable=True)
            scores, targets = scores[order], targets[order]
        self._update_images(scores, targets, ids)
        self._update_classes(scores, targets, ids)

    def _update_images(self, scores: Tensor, targets: Tensor, ids: Tensor) -> None:
        c = self.num_classes
        depth = min(max(self.k, 5), c)
        relevant = targets.gather(1, _top_k_positions(scores, depth, dim=1))  # (B, depth) in rank order
        numerator, hits_k = _ranked_sums(relevant[:, : min(self.k, c)], dim=1)
        values = (ids.clone(), numerator, hits_k, _count_true(targets, dim=1), relevant[:, 0].to(torch.int64),
                  _count_true(relevant[:, : min(5, c)], dim=1))
        for name, value in zip(_IMAGE_FIELDS, values, strict=True):
            self._images[name].append(value)

    def _update_classes(self, scores: Tensor, targets: Tensor, ids: Tensor) -> None:
        """Rows in ascending id order: select each class's top K within them (ties by row = by id), then merge."""
        positives = _count_true(targets, dim=0)
        self._positives = positives if self._positives is None else self._positives + positives
        pos, top = _top_k_set(scores, self.k, dim=0)
        self._merge_set(top, ids[pos], targets.gather(0, pos))

    def _merge_set(self, scores: Tensor, ids: Tensor, relevant: Tensor) -> None:
        """Merge (k', C) entries with arbitrary ids into the state (ties by id)."""
        if self._top_scores is None:
            self._set_top(scores, ids, relevant)
            return
        assert self._top_ids is not None and self._top_relevant is not None
        common = torch.promote_types(scores.dtype, self._top_scores.dtype)
        all_scores = torch.cat([self._top_scores.to(common), scores.to(common)])
        all_ids = torch.cat([self._top_ids, ids])
        pos, top = _top_k_set(all_scores, self.k, 0, lambda queries: all_ids[:, queries])
        self._set_top(top, all_ids.gather(0, pos),
                      torch.cat([self._top_relevant, relevant]).gather(0, pos))

    def _set_top(self, scores: Tensor, ids: Tensor, relevant: Tensor) -> None:
        self._top_scores, self._top_ids, self._top_relevant = scores, ids, relevant

    def compute(self, weights: Tensor | Sequence[float] | None = None, normalize: Normalize = "min") -> MapAtKResult:
        """All metrics over the images added so far; weights (C,) per-class MAP weights (uniform if None)."""
        _check_choice("normalize", normalize, ("min", "hits"))
        self._flush()
        if self._top_relevant is None or self._positives is None:
            raise ValueError("empty evaluation set: MapAtK.compute() called before any image was added")
        images = {name: torch.cat(parts) for name, parts in self._images.items()}
        ids, order = images["ids"].sort()
        if bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f"image id {int(ids[1:][ids[1:] == ids[:-1]][0])} was added more than once")
        images = {name: value[order] for name, value in images.items()}
        device = self._positives.device
        weights = _check_weights(weights, self.num_classes, device)

        top_ids = self._top_ids
        assert top_ids is not None and self._top_scores is not None
        order = _rank_order(self._top_scores, 0, lambda queries: top_ids[:, queries])
        numerator, hits = _ranked_sums(self._top_relevant.gather(0, order), dim=0)
        class_ap, class_valid = _finish_ap(numerator, hits, self._positives, self.k, normalize)
        recall = torch.where(class_valid, hits.to(torch.float64) / self._positives.clamp(min=1), 0.0)
        image_ap, image_valid = _finish_ap(images["numerator"], images["hits_k"], images["labels"], self.k, normalize)
        uniform = torch.ones_like(image_ap)
        return MapAtKResult(
            k=self.k,
            normalize=normalize,
            map_at_k=_weighted_mean(class_ap, class_valid, weights, "class"),
            image_map_at_k=_weighted_mean(image_ap, image_valid, uniform, "image"),
            class_recall_at_k=_weighted_mean(recall, class_valid, weights, "class"),
            precision_at_1=_weighted_mean(images["hits_1"].to(torch.float64), image_valid, uniform, "image"),
            precision_at_5=_weighted_mean(images["hits_5"].to(torch.float64) / min(5, self.num_classes),
                                          image_valid, uniform, "image"),
            per_class_ap=class_ap,
            per_class_recall=recall,
            class_positives=self._positives.clone(),
            class_valid=class_valid,
            image_ids=ids,
            per_image_ap=torch.where(image_valid, image_ap, 0.0),
            image_valid=image_valid,
        )

    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters that `load_state_dict` / `merge` need (to checkpoint or gather from workers)."""
        self._flush()
        return {
            "num_classes": self.num_classes,
            "k": self.k,
            "max_id": self._max_id,
            "top_scores": self._top_scores,
            "top_ids": self._top_ids,
            "top_relevant": self._top_relevant,
            "class_positives": self._positives,
            **{f"image_{name}": torch.cat(parts) if parts else None for name, parts in self._images.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["num_classes"], state["k"]) != (self.num_classes, self.k):
            raise ValueError(f"state is for num_classes={state['num_classes']}, k={state['k']}; this MapAtK has "
                             f"num_classes={self.num_classes}, k={self.k}")
        self.reset()
        self._max_id = int(state["max_id"])
        self._set_top(state["top_scores"], state["top_ids"], state["top_relevant"])
        self._positives = state["class_positives"]
        for name in _IMAGE_FIELDS:
            if state[f"image_{name}"] is not None:
                self._images[name].append(state[f"image_{name}"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], buffer_mib: float = 256.0) -> MapAtK:
        accumulator = cls(state["num_classes"], state["k"], buffer_mib)
        accumulator.load_state_dict(state)
        return accumulator

    def merge(self, other: MapAtK | dict[str, Any]) -> MapAtK:
        """Fold another accumulator (or its state_dict) over disjoint image ids into this one; returns self."""
        if isinstance(other, dict):
            other = MapAtK.from_state_dict(other)
        if (other.num_classes, other.k) != (self.num_classes, self.k):
            raise ValueError(f"cannot merge MapAtK(num_classes={other.num_classes}, k={other.k}) into "
                             f"MapAtK(num_classes={self.num_classes}, k={self.k})")
        other._flush()
        self._flush()
        if other._top_scores is None or other._positives is None:
            return self
        device = self._positives.device if self._positives is not None else other._positives.device
        theirs = torch.cat(other._images["ids"]).to(device)
        mine = torch.cat(self._images["ids"]) if self._images["ids"] else theirs[:0]
        shared = torch.isin(theirs, mine)
        if bool(shared.any()):
            raise ValueError(f"cannot merge: {int(shared.sum())} image ids are in both accumulators (first: "
                             f"{int(theirs[shared][0])}); give each worker distinct ids, e.g. dataset indices")
        assert other._top_ids is not None and other._top_relevant is not None
        self._merge_set(other._top_scores.to(device), other._top_ids.to(device), other._top_relevant.to(device))
        self._positives = other._positives.to(device) + (self._positives if self._positives is not None else 0)
        for name in _IMAGE_FIELDS:
            self._images[name].extend(part.to(device) for part in other._images[name])
        self._max_id = max(self._max_id, other._max_id)
        return self
