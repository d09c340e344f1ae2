"""Streaming MAP@K (`MapAtK`): bounded-memory state fed batch by batch, merged across workers, computed once.

Every metric of `MapAtKResult` comes out equal, bit for bit, to the one-shot functions of
`pipeline.evaluation.map_at_k`, ties included; `evaluate_map_at_k` is this accumulator fed in a single update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pipeline.evaluation.map_at_k import (
    Labels,
    MapAtKResult,
    Normalize,
    as_targets,
    check_choice,
    check_k,
    check_scores,
    check_weights,
    finish_ap,
    ranked_sums,
    weighted_mean,
)
from pipeline.evaluation.top_k import count_true, rank_order, top_k_positions, top_k_set

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
        self.k = check_k(k)
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
        ids = self._batch_ids(image_ids, batch, device)
        scores = check_scores(scores, ids)
        targets = as_targets(targets, scores)
        scores, targets, ids = _in_id_order(scores, targets, ids)
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

    def _batch_ids(self, image_ids: Tensor | Sequence[int] | None, batch: int, device: torch.device) -> Tensor:
        """The batch's image ids as int64: the caller's, checked, or the running counter's next `batch`."""
        if image_ids is None:
            return torch.arange(self._max_id + 1, self._max_id + 1 + batch, device=device)
        ids = torch.as_tensor(image_ids, device=device)
        if ids.shape != (batch,) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"image_ids must be {batch} integers (one per row of scores), got {ids.dtype} "
                             f"of shape {tuple(ids.shape)}")
        return ids.to(torch.int64)

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
        relevant = targets.gather(1, top_k_positions(scores, depth, dim=1))  # (B, depth) in rank order
        numerator, hits_k = ranked_sums(relevant[:, : min(self.k, c)], dim=1)
        values = (ids.clone(), numerator, hits_k, count_true(targets, dim=1), relevant[:, 0].to(torch.int64),
                  count_true(relevant[:, : min(5, c)], dim=1))
        for name, value in zip(_IMAGE_FIELDS, values, strict=True):
            self._images[name].append(value)

    def _update_classes(self, scores: Tensor, targets: Tensor, ids: Tensor) -> None:
        """Rows in ascending id order: select each class's top K within them (ties by row = by id), then merge."""
        positives = count_true(targets, dim=0)
        self._positives = positives if self._positives is None else self._positives + positives
        pos, top = top_k_set(scores, self.k, dim=0)
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
        pos, top = top_k_set(all_scores, self.k, 0, lambda queries: all_ids[:, queries])
        self._set_top(top, all_ids.gather(0, pos),
                      torch.cat([self._top_relevant, relevant]).gather(0, pos))

    def _set_top(self, scores: Tensor, ids: Tensor, relevant: Tensor) -> None:
        self._top_scores, self._top_ids, self._top_relevant = scores, ids, relevant

    def compute(self, weights: Tensor | Sequence[float] | None = None, normalize: Normalize = "min") -> MapAtKResult:
        """All metrics over the images added so far; weights (C,) per-class MAP weights (uniform if None)."""
        check_choice("normalize", normalize, ("min", "hits"))
        self._flush()
        if self._top_relevant is None or self._positives is None:
            raise ValueError("empty evaluation set: MapAtK.compute() called before any image was added")
        images = {name: torch.cat(parts) for name, parts in self._images.items()}
        ids, order = images["ids"].sort()
        if bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f"image id {int(ids[1:][ids[1:] == ids[:-1]][0])} was added more than once")
        images = {name: value[order] for name, value in images.items()}
        device = self._positives.device
        weights = check_weights(weights, self.num_classes, device)

        top_ids = self._top_ids
        assert top_ids is not None and self._top_scores is not None
        order = rank_order(self._top_scores, 0, lambda queries: top_ids[:, queries])
        numerator, hits = ranked_sums(self._top_relevant.gather(0, order), dim=0)
        class_ap, class_valid = finish_ap(numerator, hits, self._positives, self.k, normalize)
        recall = torch.where(class_valid, hits.to(torch.float64) / self._positives.clamp(min=1), 0.0)
        image_ap, image_valid = finish_ap(images["numerator"], images["hits_k"], images["labels"], self.k, normalize)
        uniform = torch.ones_like(image_ap)
        return MapAtKResult(
            k=self.k,
            normalize=normalize,
            map_at_k=weighted_mean(class_ap, class_valid, weights, "class"),
            image_map_at_k=weighted_mean(image_ap, image_valid, uniform, "image"),
            class_recall_at_k=weighted_mean(recall, class_valid, weights, "class"),
            precision_at_1=weighted_mean(images["hits_1"].to(torch.float64), image_valid, uniform, "image"),
            precision_at_5=weighted_mean(images["hits_5"].to(torch.float64) / min(5, self.num_classes),
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


def _in_id_order(scores: Tensor, targets: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's rows in ascending image id (the per-class selection breaks score ties by row); an id given twice
    within the batch is an error."""
    if ids.shape[0] > 1 and not bool((ids[1:] > ids[:-1]).all()):
        ids, order = ids.sort()
        if bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f"image_ids repeat within the batch: {int(ids[1:][ids[1:] == ids[:-1]][0])}")
        scores, targets = scores[order], targets[order]
    return scores, targets, ids


def evaluate_map_at_k(scores: Tensor, targets: Tensor | Labels, k: int = 100,
                      weights: Tensor | Sequence[float] | None = None, normalize: Normalize = "min") -> MapAtKResult:
    """MAP@K with every companion metric for one (N, C) score matrix: `MapAtK` fed in a single update."""
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (images, classes), got {getattr(scores, 'shape', type(scores).__name__)}")
    accumulator = MapAtK(scores.shape[1], k)
    accumulator.update(scores, targets)
    return accumulator.compute(weights, normalize)

