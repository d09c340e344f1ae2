"""The paper's MAP@K as a torchmetrics `Metric` (`MeanAveragePrecisionAtK`): bounded-memory streaming state fed batch
by batch, merged across processes by torchmetrics' own sync (`dist_reduce_fx`) or `merge_state`, computed once.

Every figure of `MapAtKResult` comes out equal, bit for bit, to the one-shot functions of
`pipeline.evaluation.map_at_k`, ties included; `evaluate_map_at_k` is this metric fed in a single update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

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

# List states, all reduced by "cat": name -> (dtype, whether rows have one entry per class). Candidate blocks of
# each class's top K (score, image id, relevance), per-image AP@K sums and hit counts, and rows not yet folded in.
_CLASS_STATES = {"top_scores": torch.float64, "top_ids": torch.int64, "top_relevant": torch.bool}
_IMAGE_STATES = {"image_ids": torch.int64, "image_numerator": torch.float64, "image_hits": torch.int64,
                 "image_labels": torch.int64, "image_hits_at_1": torch.int64, "image_hits_at_5": torch.int64}
_PENDING_STATES = {"pending_scores": torch.float64, "pending_targets": torch.bool, "pending_ids": torch.int64}


class MeanAveragePrecisionAtK(Metric):
    """The Xception paper's MAP@K (FastEval14k MAP@100 with the defaults) and its companions, streaming.

    `update(scores, targets, image_ids=None)` with scores (B, C) logits or probabilities and targets (B, C)
    multi-hot or B label lists; `compute()` returns the scalar figures as float64 tensors (`MapAtKResult.scalars`
    names: "map@K", "image_map@K", "class_recall@K", "precision@1", ...), ready for `log_dict`; `result()` returns
    the whole `MapAtKResult` with the per-class and per-image vectors. Both sync across processes first, as
    torchmetrics does.

    State, O(K*C + N) per process, never O(N*C): per class candidate blocks of the running top K (score as float64,
    which ranks any float dtype exactly, image id, relevance bit) and positive counts; per image its AP@K sums,
    label count and hits at 1/5; and pending rows, at most `buffer_mib` MiB, folded in a buffer at a time
    (selecting within many rows at once prunes far more than batch by batch, and each fold costs a merge). Every
    state is a torchmetrics state reduced by "cat" (the class counts by "sum"): a sync or `merge_state` concatenates
    the processes' top-K blocks (K*C*world_size) and `compute` selects the top K again, ties by image id.

    Image ids break ties (the lower id ranks first) and must be distinct across everything merged. They default to
    a running counter interleaved across the processes of torch.distributed as `DistributedSampler` deals indices
    (id = position * world_size + rank), so an unshuffled sampler's ids are the dataset indices; workers that
    evaluate other shardings pass global ids (e.g. dataset indices). The counter keeps counting across `reset()`.
    The first batch's device is the metric's (`.to(device)` moves it like any torchmetrics metric).

    >>> import torch
    >>> metric = MeanAveragePrecisionAtK(num_classes=3, k=2)
    >>> metric.update(torch.tensor([[0.9, 0.1, 0.45], [0.2, 0.8, 0.4]]), [[0], [1, 2]])  # label lists or multi-hot
    >>> metric.update(torch.tensor([[0.7, 0.6, 0.5]]), torch.tensor([[0, 0, 1]]))
    >>> metric.compute()["map@2"]  # classes 0 and 1: AP 1; class 2: positives ranked 1st and 3rd -> (1/1) / 2
    tensor(0.8333, dtype=torch.float64)
    >>> metric.result().per_class_ap
    tensor([1.0000, 1.0000, 0.5000], dtype=torch.float64)
    >>> metric.reset()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, k: int = 100, weights: Tensor | Sequence[float] | None = None,
                 normalize: Normalize = "min", buffer_mib: float = 256.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not buffer_mib > 0:
            raise ValueError(f"buffer_mib must be > 0, got {buffer_mib}")
        check_choice("normalize", normalize, ("min", "hits"))
        self.num_classes = num_classes
        self.k = check_k(k)
        self.weights = None if weights is None else check_weights(weights, num_classes, torch.device("cpu"))
        self.normalize = normalize
        self.buffer_mib = buffer_mib
        self._next_position = 0  # the default image ids' counter
        for name in (*_CLASS_STATES, *_IMAGE_STATES, *_PENDING_STATES):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("class_positives", default=torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    @property
    def num_images(self) -> int:
        return sum(len(part) for part in _parts(self.image_ids)) + self._pending_rows()

    def update(self, scores: Tensor, targets: Tensor | Labels, image_ids: Tensor | Sequence[int] | None = None) -> None:
        """Add a batch: scores (B, C), targets (B, C) multi-hot or B label lists, image_ids (B,) distinct ints."""
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a 2-D (batch, classes) tensor, got {shape}")
        batch = scores.shape[0]
        if scores.shape[1] != self.num_classes:
            raise ValueError(f"scores have {scores.shape[1]} classes; this metric was built for {self.num_classes}")
        if batch == 0:
            return
        if self.num_images == 0 and scores.device != self.device:
            self.to(scores.device)  # the first batch's device, for good
        scores = scores.to(self.device)
        ids = self._batch_ids(image_ids, batch)
        scores = check_scores(scores, ids)
        targets = as_targets(targets, scores)
        scores, targets, ids = _in_id_order(scores, targets, ids)
        capacity = _buffer_rows(self.buffer_mib, self.num_classes, scores.dtype)
        if self._pending_rows() + batch > capacity:
            self._fold_pending()
        if batch >= capacity:  # as large as a full buffer: fold it in as it is
            self._fold(scores, targets, ids)
            return
        self.pending_scores.append(scores)  # kept by reference until folded, as torchmetrics' list states are
        self.pending_targets.append(targets)
        self.pending_ids.append(ids)

    def _batch_ids(self, image_ids: Tensor | Sequence[int] | None, batch: int) -> Tensor:
        """The batch's image ids as int64: the caller's, checked, or the running counter's next `batch`."""
        if image_ids is None:
            rank, world = _rank_and_world(self.process_group)
            positions = torch.arange(self._next_position, self._next_position + batch, device=self.device)
            self._next_position += batch
            return positions * world + rank
        ids = torch.as_tensor(image_ids, device=self.device)
        if ids.shape != (batch,) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"image_ids must be {batch} integers (one per row of scores), got {ids.dtype} "
                             f"of shape {tuple(ids.shape)}")
        return ids.to(torch.int64)

    def _pending_rows(self) -> int:
        return sum(len(part) for part in _parts(self.pending_ids))

    def _fold_pending(self) -> None:
        """Fold the pending rows into the per-image results and the per-class top K."""
        if self._pending_rows() == 0:
            return
        scores, targets, ids = (dim_zero_cat(getattr(self, name)) for name in _PENDING_STATES)
        for name in _PENDING_STATES:
            setattr(self, name, [])
        self._fold(scores, targets, ids)

    def _fold(self, scores: Tensor, targets: Tensor, ids: Tensor) -> None:
        """Fold rows into the per-image results and the per-class top K (the tensors are not kept).

        An id repeated across batches is reported by `result`, which sees every id."""
        if ids.shape[0] > 1 and not bool((ids[1:] > ids[:-1]).all()):  # batches came with interleaved ids
            ids, order = ids.sort(stable=True)
            scores, targets = scores[order], targets[order]
        c = self.num_classes
        depth = min(max(self.k, 5), c)
        relevant = targets.gather(1, top_k_positions(scores, depth, dim=1))  # (B, depth) in rank order
        numerator, hits_k = ranked_sums(relevant[:, : min(self.k, c)], dim=1)
        values = (ids.clone(), numerator, hits_k, count_true(targets, dim=1), relevant[:, 0].to(torch.int64),
                  count_true(relevant[:, : min(5, c)], dim=1))
        for name, value in zip(_IMAGE_STATES, values, strict=True):
            getattr(self, name).append(value)
        # Rows are in ascending id order, so selecting by row breaks ties by id; then merge with the held blocks.
        self.class_positives = self.class_positives + count_true(targets, dim=0)
        pos, top = top_k_set(scores, self.k, dim=0)
        blocks = (top.to(torch.float64), ids[pos], targets.gather(0, pos))
        for name, block in zip(_CLASS_STATES, self._top_k(*blocks), strict=True):
            setattr(self, name, [block])

    def _top_k(self, *new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each class's top K (score, id, relevance) among the held candidate blocks and `new` ones, ties by id."""
        extras = [[block] for block in new] or [[]] * len(_CLASS_STATES)
        scores, ids, relevant = (dim_zero_cat([*_parts(getattr(self, name)), *extra])
                                 for name, extra in zip(_CLASS_STATES, extras, strict=True))
        if scores.shape[0] <= self.k:
            return scores, ids, relevant
        pos, top = top_k_set(scores, self.k, 0, lambda queries: ids[:, queries])
        return top, ids.gather(0, pos), relevant.gather(0, pos)

    def compute(self) -> dict[str, Tensor]:
        """The scalar figures (`MapAtKResult.scalars`) as float64 tensors, with the constructor's weights."""
        figures = self._result(self.weights, self.normalize).scalars()
        return {name: torch.tensor(value, dtype=torch.float64, device=self.device) for name, value in figures.items()}

    def result(self, weights: Tensor | Sequence[float] | None = None, normalize: Normalize | None = None
               ) -> MapAtKResult:
        """Every figure with its per-class and per-image vectors, synced across processes as `compute` is.

        weights (C,) per-class MAP weights and normalize default to the constructor's (uniform and "min")."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,  # as compute() syncs
                               should_unsync=self._should_unsync):
            return self._result(self.weights if weights is None else weights, normalize or self.normalize)

    def _result(self, weights: Tensor | Sequence[float] | None, normalize: Normalize) -> MapAtKResult:
        check_choice("normalize", normalize, ("min", "hits"))
        self._fold_pending()
        if self.num_images == 0:
            raise ValueError(f"empty evaluation set: {type(self).__name__} computed before any image was added")
        images = {name: dim_zero_cat(getattr(self, name)) for name in _IMAGE_STATES}
        ids, order = images.pop("image_ids").sort()
        if bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f"image id {int(ids[1:][ids[1:] == ids[:-1]][0])} was added more than once")
        images = {name: value[order] for name, value in images.items()}
        positives = self.class_positives
        weights = check_weights(weights, self.num_classes, positives.device)

        top_scores, top_ids, top_relevant = self._top_k()
        order = rank_order(top_scores, 0, lambda queries: top_ids[:, queries])
        numerator, hits = ranked_sums(top_relevant.gather(0, order), dim=0)
        class_ap, class_valid = finish_ap(numerator, hits, positives, self.k, normalize)
        recall = torch.where(class_valid, hits.to(torch.float64) / positives.clamp(min=1), 0.0)
        image_ap, image_valid = finish_ap(images["image_numerator"], images["image_hits"], images["image_labels"],
                                          self.k, normalize)
        uniform = torch.ones_like(image_ap)
        hits_at_5 = images["image_hits_at_5"].to(torch.float64) / min(5, self.num_classes)
        return MapAtKResult(
            k=self.k,
            normalize=normalize,
            map_at_k=weighted_mean(class_ap, class_valid, weights, "class"),
            image_map_at_k=weighted_mean(image_ap, image_valid, uniform, "image"),
            class_recall_at_k=weighted_mean(recall, class_valid, weights, "class"),
            precision_at_1=weighted_mean(images["image_hits_at_1"].to(torch.float64), image_valid, uniform, "image"),
            precision_at_5=weighted_mean(hits_at_5, image_valid, uniform, "image"),
            per_class_ap=class_ap,
            per_class_recall=recall,
            class_positives=positives.clone(),
            class_valid=class_valid,
            image_ids=ids,
            per_image_ap=torch.where(image_valid, image_ap, 0.0),
            image_valid=image_valid,
        )

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """torchmetrics' sync, after folding the pending rows in (so they are not sent) and giving each empty state
        an empty tensor of its dtype and width (torchmetrics' placeholder for a process without data is 1-D, in the
        metric's dtype, which a 2-D or integer state cannot be gathered with)."""
        self._fold_pending()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for name, dtype in {**_CLASS_STATES, **_IMAGE_STATES, **_PENDING_STATES}.items():
            if distributed and isinstance(getattr(self, name), list) and not getattr(self, name):
                shape = (0,) if name in _IMAGE_STATES or name == "pending_ids" else (0, self.num_classes)
                setattr(self, name, [torch.empty(shape, dtype=dtype, device=self.device)])
        super().sync(*args, **kwargs)

    @property
    def metric_state(self) -> dict[str, list[Tensor] | Tensor]:
        """The states (pending rows folded in first, so a merged or shipped state is O(K*C + N))."""
        self._fold_pending()
        return super().metric_state

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' `merge_state` (states concatenated, class counts summed), refusing another K or C."""
        if isinstance(incoming_state, MeanAveragePrecisionAtK):
            theirs = (incoming_state.num_classes, incoming_state.k)
            if theirs != (self.num_classes, self.k):
                raise ValueError(f"cannot merge a metric with num_classes={theirs[0]}, k={theirs[1]} into one with "
                                 f"num_classes={self.num_classes}, k={self.k}")
        elif isinstance(incoming_state, dict) and tuple(incoming_state["class_positives"].shape) != (self.num_classes,):
            raise ValueError(f"cannot merge a state of {incoming_state['class_positives'].numel()} classes into a "
                             f"metric of {self.num_classes}")
        super().merge_state(incoming_state)
        if isinstance(incoming_state, Metric):  # its updates count as this metric's (compute warns without any)
            self._update_count += incoming_state._update_count

    def __getstate__(self) -> dict[str, Any]:
        self._fold_pending()  # a pickled metric (e.g. a Ray worker's) carries no row buffer
        return super().__getstate__()


def _parts(state: list[Tensor] | Tensor) -> list[Tensor]:
    """A list state's tensors (a synced state is one tensor)."""
    return state if isinstance(state, list) else [state]


def _buffer_rows(buffer_mib: float, num_classes: int, dtype: torch.dtype) -> int:
    return max(1, int(buffer_mib * 2**20) // (num_classes * (dtype.itemsize + 1) + 8))


def _rank_and_world(process_group: Any) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(process_group), torch.distributed.get_world_size(process_group)
    return 0, 1


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
    """MAP@K with every companion metric for one (N, C) score matrix: `MeanAveragePrecisionAtK` fed once."""
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (images, classes), got {getattr(scores, 'shape', type(scores).__name__)}")
    metric = MeanAveragePrecisionAtK(scores.shape[1], k)
    metric.update(scores, targets)
    return metric.result(weights, normalize)
