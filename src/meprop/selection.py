"""What one backward keeps of an output gradient ``g`` (M, n): ``Selection``, and the
selections of ``meprop.ops`` (per row: ``select_rows``; whole columns: ``select_columns``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .adaptive import score_dtype
from .comm import sum_over_ranks

__all__ = ["Selection", "select_rows", "column_scores", "select_columns"]


class Selection(NamedTuple):
    """What one backward kept of the output gradient ``g`` (M, n).

    ``kind``:
      - ``"all"``: everything (k >= n); ``index`` and ``values`` are None.
      - ``"rows"``: each row its own entries: ``index``, ``values`` (M, k), the columns and
        ``g[i, index[i]]`` (a value may be 0: past an adaptive row's k, or a zero gradient).
      - ``"cols"``: the same columns for every row: ``index`` (k,), ``values = g[:, index]``
        (M, k).
    """

    kind: str
    index: Tensor | None = None
    values: Tensor | None = None


def select_rows(g: Tensor, k: int, mode: str, kernels=None) -> tuple[Tensor, Tensor]:
    """Per-row selection of ``g`` (M, n): returns ``idx`` (M, k) int64 and ``vals = g[i, idx]``.

    ``kernels``: a kernel module (see ``kernel_module``) to run top-k with, or None.
    """
    if mode == "random":
        # k distinct columns per row: the k smallest of M*n uniform keys. Uses the global RNG,
        # so torch.manual_seed makes it reproducible.
        idx = torch.rand(g.shape, device=g.device).topk(k, dim=1, sorted=False).indices
        return idx, g.gather(1, idx)
    if mode == "symmetric":
        # The k//2 largest positive and k - k//2 largest negative entries of each row. A row
        # with fewer of one sign gets zeros there (the values come from the clamped parts), so
        # a column picked by both halves carries its value once and 0 once.
        h = k // 2
        pos, neg = g.clamp(min=0), g.clamp(max=0)
        ip = pos.topk(h, dim=1, sorted=False).indices
        ineg = neg.neg().topk(k - h, dim=1, sorted=False).indices
        idx = torch.cat([ip, ineg], 1)
        return idx, torch.cat([pos.gather(1, ip), neg.gather(1, ineg)], 1)
    if kernels is not None:
        return kernels.topk_rows(g, k)
    # torch.topk orders NaN above every number, so NaN gradients are always kept.
    idx = g.abs().topk(k, dim=1, sorted=False).indices
    return idx, g.gather(1, idx)


def column_scores(g: Tensor, scope: str = "local") -> Tensor:
    """The (n,) sums of |g| over the rows of ``g`` (M, n), what unified selection ranks.

    ``scope="global"``: summed over the ranks of a torch.distributed job too (see
    ``meprop.distributed``), so every rank ranks the columns of the global batch.
    """
    # A NaN anywhere in a column makes its score NaN, which topk ranks highest. Half-precision
    # gradients are summed in float32: their rounded sums would tie or reorder columns.
    scores = g.abs().sum(0, dtype=score_dtype(g.dtype))  # (n,)
    return sum_over_ranks(scores) if scope == "global" else scores


def select_columns(g: Tensor, k: int, scope: str = "local") -> Tensor:
    """Unified selection: the k columns of ``g`` (M, n) with the largest sum of |g| (over all
    ranks with ``scope="global"``: ``column_scores``); (k,) sorted."""
    return column_scores(g, scope).topk(k, sorted=False).indices.sort().values
