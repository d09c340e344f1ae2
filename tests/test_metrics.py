"""MAP@K against a plain-Python reference written here, torchmetrics for the hits-normalised variant, hand-worked
cases, the streaming torchmetrics `Metric` = one-shot exactly, merging (`merge_state` and torchmetrics' own sync
over 2 processes) = one metric, and a clear error for every bad input."""

import dataclasses
import doctest
import math
import pickle

import numpy as np
import pytest
import torch

from pipeline.data.format import classes_from_tsv
from pipeline.evaluation import (
    MeanAveragePrecisionAtK,
    average_precision_at_k,
    class_recall_at_k,
    evaluate_map_at_k,
    map_at_k,
    multi_hot,
    precision_at_k,
)
from pipeline.evaluation.class_weights import column_weights
from pipeline.evaluation.top_k import top_k_positions

# ------------------------------------------------------------------------------------------------ references


def reference_ap(scores, targets, k, normalize="min"):
    """AP@K of each column by loops: rank rows by score desc, ties to the lower row. Returns [ap or None]."""
    n, c = scores.shape
    out = []
    for col in range(c):
        order = sorted(range(n), key=lambda i: (-float(scores[i, col]), i))[:k]
        positives = int(sum(bool(targets[i, col]) for i in range(n)))
        if positives == 0:
            out.append(None)
            continue
        hits, total = 0, 0.0
        for rank, i in enumerate(order, start=1):
            if targets[i, col]:
                hits += 1
                total += hits / rank
        denominator = min(k, positives) if normalize == "min" else hits
        out.append(total / denominator if denominator else 0.0)
    return out


def reference_map(scores, targets, k, weights=None, normalize="min", orientation="class"):
    if orientation == "image":
        scores, targets = scores.T, targets.T
    aps = reference_ap(scores, targets, k, normalize)
    weights = [1.0] * len(aps) if weights is None else list(weights)
    pairs = [(w, ap) for w, ap in zip(weights, aps, strict=True) if ap is not None]
    return sum(w * ap for w, ap in pairs) / sum(w for w, _ in pairs)


def reference_precision(scores, targets, k):
    n, c = scores.shape
    k = min(k, c)
    values = []
    for i in range(n):
        if not targets[i].any():
            continue
        order = sorted(range(c), key=lambda j: (-float(scores[i, j]), j))[:k]
        values.append(sum(bool(targets[i, j]) for j in order) / k)
    return sum(values) / len(values)


def make_case(seed, n, c, tied, force_columns=True):
    """Scores (float64 or small integers for ties) and targets with columns of 0, 1 and many positives."""
    rng = np.random.default_rng(seed)
    targets = rng.random((n, c)) < rng.uniform(0.02, 0.4, size=c)
    if force_columns and c >= 3:
        targets[:, 0] = False  # no positive: skipped
        targets[:, 1] = False
        targets[rng.integers(n), 1] = True  # exactly one positive
        targets[:, 2] = rng.random(n) < 0.8  # more positives than K
    targets[0, 2 % c] = True  # at least one positive somewhere
    if tied:
        scores = rng.integers(0, 4, size=(n, c)).astype(np.float64) + targets  # many ties, still informative
    else:
        scores = rng.standard_normal((n, c)) + 1.5 * targets
    return scores, targets


# ------------------------------------------------------------------------------------------------ hand-worked


def test_hand_computed_cases():
    # 5 images x 3 classes, K = 3.
    # class 0: scores 0.9 .. 0.5 rank images 0..4; relevant images 0, 2, 4. Top 3 = images 0 (hit), 1, 2 (hit):
    #   P@1 = 1/1, P@3 = 2/3 -> sum 5/3; positives 3 -> AP = (5/3) / min(3, 3) = 5/9; hits-normalised (5/3)/2 = 5/6.
    # class 1: only image 4 relevant, ranked 5th -> no hit in the top 3 -> AP = 0 (both normalisations).
    # class 2: no positive -> skipped.
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.4, 0.2], [0.7, 0.3, 0.3], [0.6, 0.2, 0.4], [0.5, 0.1, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    ap, valid = average_precision_at_k(scores, targets, k=3)
    assert valid.tolist() == [True, True, False]
    assert ap.tolist() == pytest.approx([5 / 9, 0.0, 0.0])
    assert map_at_k(scores, targets, k=3) == pytest.approx((5 / 9 + 0) / 2)  # = 5/18
    # weights 1, 3, 5: class 2 has no positive, so (1 * 5/9 + 3 * 0) / (1 + 3) = 5/36
    assert map_at_k(scores, targets, k=3, weights=torch.tensor([1.0, 3.0, 5.0])) == pytest.approx(5 / 36)
    assert map_at_k(scores, targets, k=3, normalize="hits") == pytest.approx((5 / 6 + 0) / 2)
    # recall@3: class 0 has 2 of its 3 positives in the top 3, class 1 has 0 of 1 -> (2/3 + 0) / 2 = 1/3
    assert class_recall_at_k(scores, targets, k=3) == pytest.approx(1 / 3)
    # the streaming metric, fed in two batches, gives the same hand-computed numbers
    for weights, normalize, expected in [(None, "min", 5 / 18), ([1.0, 3.0, 5.0], "min", 5 / 36),
                                         (None, "hits", 5 / 12)]:
        metric = MeanAveragePrecisionAtK(3, k=3, weights=weights, normalize=normalize)
        metric.update(scores[:2], targets[:2])
        metric.update(scores[2:], targets[2:])
        figures = metric.compute()
        assert figures["map@3"].item() == pytest.approx(expected)
        assert figures["class_recall@3"].item() == pytest.approx(1 / 3 if weights is None else (2 / 3) / 4)


def test_ties_go_to_the_lower_index():
    # One class, scores 1, 1, 1, 0, 0; only image 2 relevant. Ties rank images 0, 1, 2 in index order:
    # K = 2 -> top 2 = images 0, 1 -> AP 0. K = 3 -> image 2 at rank 3: P@3 = 1/3, positives 1 -> AP = 1/3.
    scores = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0]])
    targets = torch.tensor([[0], [0], [1], [0], [0]])
    assert map_at_k(scores, targets, k=2) == 0.0
    assert map_at_k(scores, targets, k=3) == pytest.approx(1 / 3)


def test_per_image_orientation_by_hand():
    # Image 0: scores over 4 classes 0.1, 0.4, 0.3, 0.2 rank classes 1, 2, 3, 0; labels {1, 3}. K = 2:
    #   rank 1 = class 1 (hit, P@1 = 1), rank 2 = class 2 (miss) -> sum 1 -> / min(2, 2 labels) = 1/2.
    # Image 1: no label -> skipped. Image 2: label {0}, class 0 ranked first -> AP 1. Mean (1/2 + 1) / 2 = 3/4.
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.1, 0.2, 0.3], [0.9, 0.1, 0.1, 0.1]])
    labels = [[1, 3], [], [0]]
    ap, valid = average_precision_at_k(scores, labels, k=2, orientation="image")
    assert valid.tolist() == [True, False, True] and ap.tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert map_at_k(scores, labels, k=2, orientation="image") == pytest.approx(0.75)
    # precision@1: image 0 top class 1 (hit), image 2 top class 0 (hit) -> 1. precision@2: (1/2 + 1/2) / 2 = 1/2.
    assert precision_at_k(scores, labels, k=1) == 1.0
    assert precision_at_k(scores, labels, k=2) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ vs reference


@pytest.mark.parametrize(("n", "c", "k"), [(1, 1, 1), (7, 5, 3), (12, 9, 100), (60, 14, 3), (400, 8, 10),
                                           (250, 30, 1), (90, 70, 5)])
@pytest.mark.parametrize("tied", [False, True])
def test_map_matches_reference(n, c, k, tied):
    scores, targets = make_case(n * 1000 + c + k + tied, n, c, tied)
    weights = np.random.default_rng(k).uniform(0, 2, size=c)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    for normalize in ("min", "hits"):
        expected = reference_ap(scores, targets, k, normalize)
        ap, valid = average_precision_at_k(s, t, k, normalize=normalize)
        assert valid.tolist() == [e is not None for e in expected]
        assert ap.tolist() == pytest.approx([0.0 if e is None else e for e in expected], abs=1e-12)
        assert map_at_k(s, t, k, normalize=normalize) == pytest.approx(
            reference_map(scores, targets, k, normalize=normalize), abs=1e-6)
        assert map_at_k(s, t, k, weights=torch.from_numpy(weights), normalize=normalize) == pytest.approx(
            reference_map(scores, targets, k, weights, normalize=normalize), abs=1e-6)
        if targets.any(axis=1).any():
            assert map_at_k(s, t, k, orientation="image", normalize=normalize) == pytest.approx(
                reference_map(scores, targets, k, normalize=normalize, orientation="image"), abs=1e-6)
    assert precision_at_k(s, t, 1) == pytest.approx(reference_precision(scores, targets, 1))
    assert precision_at_k(s, t, 5) == pytest.approx(reference_precision(scores, targets, 5))


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize(("m", "k", "levels"), [(2000, 10, 1000), (3000, 100, 50), (700, 7, 3), (5000, 30, 2)])
def test_pruned_ranking_is_exact(dim, m, k, levels):
    """The pruned top-k (used at scale) equals a full stable ranking, with and without heavy ties."""
    rng = np.random.default_rng(m + k + levels)
    values = rng.integers(0, levels, size=(m, 6)).astype(np.float32)
    values[:, 0] = rng.standard_normal(m)  # a tie-free column next to tied ones
    values[:, 1] = 0  # all equal
    values = values if dim == 0 else values.T.copy()
    ranked = top_k_positions(torch.from_numpy(values), k, dim).numpy()
    index = np.broadcast_to(np.arange(m)[:, None] if dim == 0 else np.arange(m)[None, :], values.shape)
    expected = np.lexsort((index, -values), axis=dim)  # score desc, then index asc
    np.testing.assert_array_equal(ranked, expected[:k] if dim == 0 else expected[:, :k])


def test_logits_and_probabilities_rank_alike():
    scores, targets = make_case(3, 80, 12, tied=False)
    logits = torch.from_numpy(scores)
    assert map_at_k(logits, targets=torch.from_numpy(targets)) == map_at_k(torch.sigmoid(logits),
                                                                             torch.from_numpy(targets))


def test_target_dtypes_and_label_lists_agree():
    scores, targets = make_case(4, 50, 9, tied=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    labels = [np.flatnonzero(row).tolist() for row in targets]
    expected = map_at_k(s, t, k=7)
    for variant in (t.to(torch.uint8), t.float(), t.to(torch.int64), targets, labels):  # targets: numpy
        assert map_at_k(s, variant, k=7) == expected
    assert map_at_k(s.to(torch.int64), t, k=7) == expected  # integer scores: compared as float64


# ------------------------------------------------------------------------------------------------ torchmetrics


@pytest.mark.parametrize("orientation", ["class", "image"])
def test_hits_normalised_variant_equals_torchmetrics(orientation):
    from torchmetrics.retrieval import RetrievalMAP

    scores, targets = make_case(5, 120, 25, tied=False)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    k = 10
    if orientation == "image":
        preds, target, queries = torch.sigmoid(s), t, torch.arange(120).unsqueeze(1).expand(120, 25)
    else:
        preds, target, queries = torch.sigmoid(s).t(), t.t(), torch.arange(25).unsqueeze(1).expand(25, 120)
    metric = RetrievalMAP(top_k=k, empty_target_action="skip")  # sigmoid > 0, so no score counts as irrelevant
    metric.update(preds.reshape(-1), target.reshape(-1), indexes=queries.reshape(-1))
    ours = map_at_k(s, t, k, orientation=orientation, normalize="hits")
    assert ours == pytest.approx(float(metric.compute()), abs=1e-6)
    assert ours != pytest.approx(map_at_k(s, t, k, orientation=orientation), abs=1e-6)  # a different number
    streaming = MeanAveragePrecisionAtK(25, k, normalize="hits")
    for start in range(0, 120, 32):
        streaming.update(s[start:start + 32], t[start:start + 32])
    name = f"map@{k}" if orientation == "class" else f"image_map@{k}"
    assert float(streaming.compute()[name]) == ours


# ------------------------------------------------------------------------------------------------ streaming


def assert_results_equal(a, b, ids=True):
    for name in ("map_at_k", "image_map_at_k", "class_recall_at_k", "precision_at_1", "precision_at_5"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("per_class_ap", "per_class_recall", "class_positives", "class_valid", "image_ids", "per_image_ap",
                 "image_valid"):
        if ids or name != "image_ids":
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def streaming_metric(c: int, k: int = 100, buffer_rows: int | None = None, itemsize: int = 4, **kwargs):
    """`MeanAveragePrecisionAtK` with a row buffer of `buffer_rows` rows (default: 256 MiB), to fold batches in at
    chosen points."""
    if buffer_rows is not None:
        kwargs["buffer_mib"] = buffer_rows * (c * (itemsize + 1) + 8) / 2**20
    return MeanAveragePrecisionAtK(c, k, **kwargs)


@pytest.mark.parametrize("buffer_rows", [None, 1, 7, 130])
@pytest.mark.parametrize(("tied", "k"), [(False, 5), (True, 5), (True, 100)])
def test_streaming_equals_one_shot(tied, k, buffer_rows):
    n, c = 900, 12
    scores, targets = make_case(6 + k + tied, n, c, tied)
    s, t = torch.from_numpy(scores).float(), torch.from_numpy(targets)
    rng = np.random.default_rng(7)
    metric = streaming_metric(c, k, buffer_rows)
    start = 0
    while start < n:
        size = int(rng.choice([1, 3, 17, 64, 150]))  # uneven; large batches exercise the pruned merge
        stop = min(n, start + size)
        batch_targets = t[start:stop] if start % 2 else [np.flatnonzero(r).tolist() for r in targets[start:stop]]
        metric.update(s[start:stop], batch_targets)
        start = stop
    weights = torch.from_numpy(rng.uniform(0, 1, size=c))
    for normalize in ("min", "hits"):
        streamed = metric.result(weights, normalize)
        ap, valid = average_precision_at_k(s, t, k, normalize=normalize)
        assert torch.equal(streamed.per_class_ap, ap) and torch.equal(streamed.class_valid, valid)
        assert streamed.map_at_k == map_at_k(s, t, k, weights, normalize=normalize)
        image_ap, _ = average_precision_at_k(s, t, k, orientation="image", normalize=normalize)
        assert torch.equal(streamed.per_image_ap, image_ap)
        assert streamed.image_map_at_k == map_at_k(s, t, k, orientation="image", normalize=normalize)
        assert_results_equal(streamed, evaluate_map_at_k(s, t, k, weights, normalize))
    result = metric.result(weights)
    assert result.class_recall_at_k == class_recall_at_k(s, t, k, weights)
    assert result.precision_at_1 == precision_at_k(s, t, 1) and result.precision_at_5 == precision_at_k(s, t, 5)
    assert result.scalars()[f"map@{k}"] == result.map_at_k and result.num_images == n
    # compute(): the same figures as float64 tensors, with the constructor's weights
    assert metric.compute()[f"map@{k}"].item() == metric.result().map_at_k == map_at_k(s, t, k)
    weighted = streaming_metric(c, k, buffer_rows, weights=weights)
    weighted.merge_state(metric)
    assert {name: value.item() for name, value in weighted.compute().items()} == result.scalars()


def test_more_k_than_images():
    scores, targets = make_case(13, 7, 6, tied=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    metric = MeanAveragePrecisionAtK(6, k=50)
    for start in range(0, 7, 3):
        metric.update(s[start:start + 3], t[start:start + 3])
    for normalize in ("min", "hits"):
        result = metric.result(normalize=normalize)
        assert result.map_at_k == pytest.approx(reference_map(scores, targets, 50, normalize=normalize), abs=1e-12)
        assert_results_equal(result, evaluate_map_at_k(s, t, 50, normalize=normalize))
    assert metric.compute()["map@50"].item() == map_at_k(s, t, 50)


@pytest.mark.parametrize("buffer_rows", [None, 50])
def test_streaming_with_ids_out_of_order(buffer_rows):
    """Explicit image ids in any order rank ties by id, like one-shot scoring of the rows sorted by id."""
    n, c, k = 300, 10, 20
    scores, targets = make_case(8, n, c, tied=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    ids = torch.from_numpy(np.random.default_rng(9).permutation(n))
    metric = streaming_metric(c, k, buffer_rows, itemsize=8)
    for start in range(0, n, 37):
        metric.update(s[start:start + 37], t[start:start + 37], ids[start:start + 37])
    by_id = ids.argsort()
    assert_results_equal(metric.result(), evaluate_map_at_k(s[by_id], t[by_id], k))


@pytest.mark.parametrize("buffer_rows", [None, 30])
def test_streaming_promotes_dtypes_and_skips_empty_batches(buffer_rows):
    scores, targets = make_case(12, 200, 9, tied=False)
    s, t = torch.from_numpy(scores).float(), torch.from_numpy(targets)
    metric = streaming_metric(9, 10, buffer_rows)
    metric.update(s[:100], t[:100])
    metric.update(s[:0], t[:0])
    metric.update(s[100:].double(), t[100:])  # float32 values, so float64 ranks them identically
    assert_results_equal(metric.result(), evaluate_map_at_k(s, t, 10))


def test_streaming_buffer_stays_within_its_budget():
    metric = MeanAveragePrecisionAtK(1000, 10, buffer_mib=1)  # 209 rows of 1000 float32 scores and targets
    scores = torch.randn(500, 1000)
    for start in range(0, 500, 50):
        metric.update(scores[start:start + 50], scores[start:start + 50] > 1)
    pending = metric.pending_scores + metric.pending_targets + metric.pending_ids
    assert sum(part.nbytes for part in pending) <= 2**20
    assert metric.num_images == 500 and sum(map(len, metric.pending_ids)) == 100  # 200 rows folded in twice
    metric.update(scores, scores > 1, image_ids=range(500, 1000))  # a full buffer's worth: folded in as it is
    assert metric.num_images == 1000 and metric.pending_ids == []
    with pytest.raises(ValueError, match="buffer_mib must be > 0"):
        MeanAveragePrecisionAtK(10, buffer_mib=0)


@pytest.mark.parametrize("buffer_rows", [None, 40])
def test_merging_workers_equals_one_metric(buffer_rows):
    """torchmetrics' `merge_state` (of a metric or its `metric_state`) and pickling, as the evaluator's Ray shares
    use them."""
    n, c, k = 600, 15, 8
    scores, targets = make_case(10, n, c, tied=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    single = streaming_metric(c, k, buffer_rows, itemsize=8)
    workers = [streaming_metric(c, k, buffer_rows, itemsize=8) for _ in range(2)]
    for start in range(0, n, 50):
        rows = torch.arange(start, min(n, start + 50))
        single.update(s[rows], t[rows])
        for w, part in enumerate((rows[rows % 2 == 0], rows[rows % 2 == 1])):  # interleaved shards, global ids
            workers[w].update(s[part], t[part], image_ids=part)
    merged = MeanAveragePrecisionAtK(c, k)
    merged.merge_state(workers[0].metric_state)
    merged.merge_state(pickle.loads(pickle.dumps(workers[1])))
    assert_results_equal(merged.result(), single.result())
    assert_results_equal(pickle.loads(pickle.dumps(single)).result(), single.result())
    merged.merge_state(workers[1])
    with pytest.raises(ValueError, match="image id 1 was added more than once"):
        merged.result()
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge_state(MeanAveragePrecisionAtK(c, k + 1))
    with pytest.raises(ValueError, match="cannot merge a state of 15 classes"):
        MeanAveragePrecisionAtK(c + 1, k).merge_state(workers[0].metric_state)


def test_reset_and_use_in_a_plain_loop():
    """The metric as a user's evaluation loop (or Lightning's) uses it: update per batch, compute, reset; and
    forward, which returns the batch's figures and accumulates."""
    scores, targets = make_case(14, 240, 20, tied=False)
    s, t = torch.from_numpy(scores).float(), torch.from_numpy(targets)
    metric = MeanAveragePrecisionAtK(num_classes=20, k=100)
    for epoch in range(2):
        for start in range(0, 240, 64):
            metric.update(s[start:start + 64], t[start:start + 64])
        figures = metric.compute()  # {"map@100": tensor(...), "image_map@100": ..., "precision@1": ..., ...}
        assert figures["map@100"].item() == map_at_k(s, t, 100)
        assert figures["image_map@100"].item() == map_at_k(s, t, 100, orientation="image")
        assert figures["num_images"].item() == 240
        assert_results_equal(metric.result(), evaluate_map_at_k(s, t, 100), ids=epoch == 0)  # ids count on
        metric.reset()
    with pytest.raises(ValueError, match="empty evaluation set"), pytest.warns(UserWarning, match="before the"):
        metric.compute()
    for start in range(0, 240, 64):
        batch = metric(s[start:start + 64], t[start:start + 64])
        assert batch["map@100"].item() == map_at_k(s[start:start + 64], t[start:start + 64], 100)
    assert metric.compute()["map@100"].item() == map_at_k(s, t, 100)


def test_docstring_example():
    from pipeline.evaluation import map_metric

    assert doctest.testmod(map_metric).failed == 0


def _sync_worker(rank: int, world: int, port: int, out: str, k: int) -> None:
    """One process of `test_torch_distributed_sync`: its half of the rows, then compute with torchmetrics' sync."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        scores, targets = make_case(15, 301, 11, tied=True)
        s, t = torch.from_numpy(scores).float(), torch.from_numpy(targets)
        dealt = MeanAveragePrecisionAtK(11, k, buffer_mib=0.01)  # default ids: dealt like DistributedSampler's
        mine = torch.arange(rank, 301, world)
        for start in range(0, len(mine), 40):
            dealt.update(s[mine[start:start + 40]], t[mine[start:start + 40]])
        alone = MeanAveragePrecisionAtK(11, k)  # every row on rank 0 (explicit ids), nothing on rank 1
        if rank == 0:
            alone.update(s, t, image_ids=torch.arange(301))
        torch.save({"dealt": dealt.result(), "dealt_figures": dealt.compute(), "alone": alone.result(),
                    "local_images": dealt.num_images}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("k", [5, 500])
def test_torch_distributed_sync(tmp_path, k):
    """Two gloo processes on 127.0.0.1, each updating with its half: compute and result equal one process's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_sync_worker, args=(2, port, str(tmp_path), k), nprocs=2)
    scores, targets = make_case(15, 301, 11, tied=True)
    s, t = torch.from_numpy(scores).float(), torch.from_numpy(targets)
    expected = evaluate_map_at_k(s, t, k)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert out["local_images"] == (151, 150)[rank]  # the local state is back after the synced compute
        assert_results_equal(out["dealt"], expected)
        assert_results_equal(out["alone"], expected)
        assert {name: value.item() for name, value in out["dealt_figures"].items()} == expected.scalars()


# ------------------------------------------------------------------------------------------------ helpers


def test_multi_hot():
    assert multi_hot([[0, 2], [], [1]], 3).tolist() == [[True, False, True], [False] * 3, [False, True, False]]
    with pytest.raises(ValueError, match="label 5 of image 1 is outside"):
        multi_hot([[0], [1, 5]], 3)


def test_class_weights_are_the_weight_column_of_the_classes_file():
    text = "id\tname\ttrain_frequency\tweight\n0\tcat\t10\t0.5\n1\tdog\t3\t0\n2\temu\t1\t2\n"
    assert column_weights(classes_from_tsv(text), "eval/classes.tsv").tolist() == [0.5, 0.0, 2.0]
    for row, message in [("2\temu\t1\t", r"eval/classes.tsv: 1 of 3 classes have no weight \(first: class 2\)"),
                         ("2\temu\t1\t-1", r"eval/classes.tsv: the weight of class 2 \(emu\) must be finite and >= 0"),
                         ("2\temu\t1\tnan", "must be finite")]:
        classes = classes_from_tsv(text.rsplit("2\temu", 1)[0] + row + "\n")
        with pytest.raises(ValueError, match=message):
            column_weights(classes, "eval/classes.tsv")


# ------------------------------------------------------------------------------------------------ bad input

S, T = torch.rand(3, 4), torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: map_at_k(S, torch.zeros(3, 5)), r"targets shape \(3, 5\) does not match scores shape \(3, 4\)"),
    (lambda: map_at_k(torch.rand(0, 4), torch.zeros(0, 4)), "empty evaluation set"),
    (lambda: map_at_k(torch.rand(3), torch.zeros(3)), "2-D"),
    (lambda: map_at_k(S, T, k=0), "k must be an integer >= 1"),
    (lambda: map_at_k(S, T, weights=torch.ones(5)), r"weights must have shape \(4,\)"),
    (lambda: map_at_k(S, T, weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), "class 1 has weight -1"),
    (lambda: map_at_k(S, T, weights=torch.zeros(4)), "all zero"),
    (lambda: map_at_k(S, torch.tensor([[0, 1, 0, 0]] * 3), weights=torch.tensor([1.0, 0, 1, 1])), "weight 0"),
    (lambda: map_at_k(S, torch.zeros(3, 4)), "no class has a positive label"),
    (lambda: map_at_k(S, T * 2), "multi-hot 0/1; 4 values are not"),
    (lambda: map_at_k(S, T, orientation="row"), "orientation='row'"),
    (lambda: map_at_k(S, T, normalize="mean"), "normalize='mean'"),
    (lambda: map_at_k(S, T, weights=torch.ones(4), orientation="image"), "weights are per class"),
    (lambda: map_at_k(S, [[0], [1]]), "2 label lists for 3 images"),
    (lambda: MeanAveragePrecisionAtK(4).compute(), "empty evaluation set"),
    (lambda: MeanAveragePrecisionAtK(5).update(S, T), "built for 5"),
    (lambda: MeanAveragePrecisionAtK(4).update(S, T, image_ids=[0, 1, 1]), "repeat within the batch"),
    (lambda: MeanAveragePrecisionAtK(4).update(S, T, image_ids=[0.0, 1.0, 2.0]), "image_ids must be 3 integers"),
])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_finite_scores_are_located():
    scores = S.clone()
    scores[1, 2], scores[2, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite values \(NaN or Inf\); first at image 1, class 2: nan"):
        map_at_k(scores, T)
    metric = MeanAveragePrecisionAtK(4)
    with pytest.raises(ValueError, match=r"first at batch row 1 \(image id 11\), class 2"):
        metric.update(scores, T, image_ids=[10, 11, 12])
    huge = torch.full((3, 4), 3e38)  # the float32 sum overflows, yet every value is finite
    assert math.isfinite(map_at_k(huge, T))


@pytest.mark.parametrize("buffer_rows", [None, 2])
def test_repeated_image_ids_across_batches_are_refused(buffer_rows):
    metric = streaming_metric(4, buffer_rows=buffer_rows)
    metric.update(S, T, image_ids=[0, 1, 2])
    metric.update(S, T, image_ids=[2, 3, 4])
    with pytest.raises(ValueError, match="image id 2 was added more than once"):
        metric.result()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    scores, targets = make_case(11, 500, 40, tied=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    metric = MeanAveragePrecisionAtK(40, 10)
    for start in range(0, 500, 64):
        metric.update(s[start:start + 64].cuda(), t[start:start + 64].cuda())
    on_gpu = metric.result()
    assert metric.device.type == "cuda" and metric.compute()["map@10"].is_cuda
    assert on_gpu.per_class_ap.is_cuda
    on_cpu = dataclasses.replace(on_gpu, **{f.name: getattr(on_gpu, f.name).cpu() for f in dataclasses.fields(on_gpu)
                                            if isinstance(getattr(on_gpu, f.name), torch.Tensor)})
    assert_results_equal(on_cpu, evaluate_map_at_k(s, t, 10))
