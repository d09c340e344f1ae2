"""Top-k selection and ranking along one dim of a score matrix, in a strict total order (value desc, position asc).

dim=0 ranks the rows of each column (images for a class: the per-class orientation), dim=1 the columns of each row
(classes for an image). Both work on the (N, C) tensor as laid out; nothing is transposed. Selection (`top_k_set`)
and ordering (`rank_order`) are separate because sorting k values per query costs more than selecting them, and
the streaming state never needs an order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Tie-break keys on demand: given query indices, the keys of those queries' entries, shaped like
# values.index_select(1 - dim, queries). Asked only for queries with ties, so ids need not be materialised.
Keys = Callable[[Tensor], Tensor]


def _key_shape(dim: int, length: int) -> list[int]:
    shape = [1, 1]
    shape[dim] = length
    return shape


def top_k_positions(values: Tensor, k: int, dim: int) -> Tensor:
    """Positions (int64) of the top min(k, M) values along `dim` (length M), ranked by (value desc, position asc)."""
    chosen, chosen_values = top_k_set(values, k, dim)
    order = rank_order(chosen_values, dim, lambda queries: chosen.index_select(1 - dim, queries))
    return chosen.gather(dim, order)


def rank_order(chosen_values: Tensor, dim: int, keys: Keys) -> Tensor:
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


def top_k_set(values: Tensor, k: int, dim: int, keys: Keys | None = None,
               prune: bool = True) -> tuple[Tensor, Tensor]:
    """Positions of the top min(k, M) values along `dim` by (value desc, key asc), in no particular order, and
    those values (a new tensor: selection has them at hand, and gathering them again is a random read).

    keys default to the position. Ranking is left to `rank_order` because sorting k values per query costs
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
    straddle = count_true(at_cut, dim) > 1
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
    """`top_k_set` that only looks inside the k+1 units (of `group` positions) with the largest maxima.

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

    chosen, chosen_values = top_k_set(candidates, k, dim, candidate_positions)
    in_body = kept.gather(dim, chosen % (k + 1)) + (chosen // (k + 1)) * units
    positions = torch.where(chosen < n_kept, in_body, chosen - n_kept + body_len)
    unsafe = chosen_values.amin(dim=dim) <= kept_max.amin(dim=dim)
    if bool(unsafe.any()):
        queries = unsafe.nonzero().flatten()
        exact, exact_values = top_k_set(values.index_select(other, queries), k, dim, prune=False)
        positions.index_copy_(other, queries, exact)
        chosen_values.index_copy_(other, queries, exact_values)
    return positions, chosen_values


def count_true(flags: Tensor, dim: int) -> Tensor:
    """Number of True along `dim` as int64 (uint8 partial sums of 255: far faster than bool.sum)."""
    m = flags.shape[dim]
    as_bytes = flags.view(torch.uint8)
    full = m // 255 * 255
    counts = as_bytes.narrow(dim, full, m - full).sum(dim, dtype=torch.int64)
    if full:
        partial = as_bytes.narrow(dim, 0, full).unflatten(dim, (-1, 255)).sum(dim + 1, dtype=torch.uint8)
        counts += partial.sum(dim, dtype=torch.int64)
    return counts
