"""Adaptive k: how many output-gradient entries a layer keeps, chosen at every backward.

``MePropConfig(k=K_MAX, adapt=AdaptiveK(...))`` (``meprop.config``) turns it on; the functions
here compute the k's from the gradient, and ``KRecord`` is the per-layer memory they need
(TinyProp's largest error so far) and what a layer reports (``last_k``).

Each function returns integer k's clamped to ``[adapt.min_k, k_max]`` as a tensor on the
gradient's device, and updates the record in one host read (the bound of the selection that
follows is needed on the host anyway).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import AdaptiveK

__all__ = ["KRecord", "row_ks", "tinyprop_ks", "batch_k", "traced_ks", "score_dtype"]

_SCORE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradient magnitudes are summed in: float32 for half-precision gradients (their
    rounded sums would tie or reorder columns), else the gradient's own."""
    return _SCORE_DTYPE.get(dtype, dtype)


class KRecord:
    """One meProp layer's adaptive-k state and report.

    Attributes:
        depth: the layer's position counted from the network's last converted layer (0)
            towards the input; TinyProp's ``damping ** depth`` (``sparsify_`` sets it).
        y_max: the largest error size (TinyProp's ``Y``) this layer has seen; 0 before any.
        last_k: the mean k of the layer's latest backward (per example: over the rows), or
            None before its first one. With a fixed k: ``min(k, out_features)``.
        calls: how many training forward passes the layer has run (``MePropConfig.warmup``).
        memory: the gradient (out_features,) that ``MePropConfig.memory`` carries into the
            next backward, or None (zero).
        state: (3,) float64 on the CPU, ``[y_max, last_k, written]``: what a backward traced
            by torch.compile reads and writes (it cannot set Python attributes); ``written``
            is 1 until the next read of ``y_max`` or ``last_k`` takes the values over.
    """

    def __init__(self, depth: int = 0, y_max: float = 0.0, last_k: float | None = None) -> None:
        self.depth = depth
        # MePropConfig.warmup: training forward passes seen; MePropConfig.memory: the (n,)
        # gradient carried to the next backward (None: zero, until a backward keeps one)
        self.calls = 0
        self.memory: Tensor | None = None
        self.state = torch.tensor([y_max, 0.0, 0.0], dtype=torch.float64)
        self._view = self.state.numpy()  # the same memory: eager reads cost no tensor op
        self._y_max, self._last_k = y_max, last_k

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_view"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._view = self.state.numpy()

    def _take_state(self) -> None:
        # (eager code only: a traced backward writes the state, eager reads take it over)
        if not torch.compiler.is_compiling() and self._view[2] != 0:
            y_max, last_k, _ = self._view.tolist()
            self._y_max, self._last_k = y_max, last_k
            self._view[2] = 0

    @property
    def y_max(self) -> float:
        self._take_state()
        return self._y_max

    @y_max.setter
    def y_max(self, value: float) -> None:
        self._take_state()
        self._y_max = value
        self._view[0] = value

    @property
    def last_k(self) -> float | None:
        self._take_state()
        return self._last_k

    @last_k.setter
    def last_k(self, value: float | None) -> None:
        self._take_state()
        self._last_k = value

    def __repr__(self) -> str:
        return f"KRecord(depth={self.depth}, y_max={self.y_max}, last_k={self.last_k})"


def _tinyprop_share(y: Tensor, y_max: Tensor, adapt: AdaptiveK, depth: int) -> Tensor:
    span = adapt.s_max - adapt.s_min
    # y_max > 0 unless every error so far was zero (then keep the least share)
    ratio = torch.where(y_max > 0, y / y_max.clamp_min(torch.finfo(y.dtype).tiny), 0.0)
    return (adapt.s_min + span * ratio) * adapt.damping**depth


def _mass_count(top: Tensor, total: Tensor, share: float) -> Tensor:
    """The fewest leading entries of ``top`` (..., K) (sorted, descending) whose sum reaches
    ``share * total`` (...): the number of prefix sums below the target, plus one."""
    cum = top.cumsum(-1)
    return (cum < share * total.unsqueeze(-1)).sum(-1) + 1


def row_ks(
    g: Tensor, k_max: int, adapt: AdaptiveK, record: KRecord, kernels=None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per-example k's of ``g`` (M, n) with ``k_max < n``, and the selection they make.

    Returns ``(idx, vals, ks, K)``: ``ks`` (M,) int64 each row's k, ``K = max(ks)``; ``idx``,
    ``vals`` (M, K) each row's K largest |g| (columns and values) in descending order of |g|,
    with the values past the row's k set to zero. Sets ``record.last_k`` (and ``y_max``).
    ``kernels``: a kernel module whose (unsorted) ``topk_rows`` to use; None: ``torch.topk``.
    """
    dt = score_dtype(g.dtype)
    if adapt.rule == "tinyprop":  # k's first, from the rows' L1 norms: then the top K only
        ks, big = tinyprop_ks(g, k_max, adapt, record)
        idx, vals, top = _sorted_topk(g, big, kernels)
    else:  # mass: the top k_max sorted, then how many of them reach the share
        idx, vals, top = _sorted_topk(g, k_max, kernels)
        if adapt.measure == "square":
            top, total = top.to(dt).square(), g.to(dt).square().sum(1)
        else:
            top, total = top.to(dt), g.abs().sum(1, dtype=dt)
        ks = _mass_count(top, total, adapt.share).clamp_(adapt.min_k, k_max)
        big = _read(ks, None, record, dt)
        idx, vals = idx[:, :big], vals[:, :big]
    vals = vals.masked_fill(torch.arange(big, device=g.device) >= ks.unsqueeze(1), 0)
    return idx, vals, ks, big


def tinyprop_ks(g: Tensor, k_max: int, adapt: AdaptiveK, record: KRecord) -> tuple[Tensor, int]:
    """TinyProp's per-example k's of ``g`` (M, n): ``(ks (M,) int64, max(ks))``; updates the
    record's largest error and ``last_k``."""
    dt = score_dtype(g.dtype)
    y = g.abs().sum(1, dtype=dt)  # (M,) the error size of each example
    y_max = torch.maximum(y.max(), y.new_tensor(record.y_max)) if len(y) else y.new_zeros(())
    share = _tinyprop_share(y, y_max, adapt, record.depth)
    ks = (share * g.shape[1]).round().long().clamp_(adapt.min_k, k_max)
    return ks, _read(ks, y_max, record, dt)


def traced_ks(
    top: Tensor,
    g: Tensor,
    k_max: int,
    adapt: AdaptiveK,
    depth: int,
    y_max: Tensor,
    batch: bool = False,
) -> tuple[Tensor, Tensor]:
    """``row_ks``'s (or with ``batch``, ``batch_k``'s) k's kept as tensors, for a backward that
    torch.compile traces (no host read, no Python state): ``(ks (M,) int64, the new y_max)``.

    ``g`` (M, n) the gradient and ``top`` (M, k_max) the k_max largest |g| of each row,
    descending, in the score dtype; with ``batch``, ``g`` is the (1, n) column scores of a
    unified call and ``top`` their k_max largest. ``y_max``: the largest error so far (0-dim).
    """
    dt = top.dtype
    if adapt.rule == "mass":
        if adapt.measure == "square":
            top, total = top.square(), g.to(dt).square().sum(1)
        else:
            total = g.abs().sum(1, dtype=dt)
        ks = _mass_count(top, total, adapt.share)
    else:
        y = g.abs().sum(1, dtype=dt)  # (M,) each example's error size (batch: the call's)
        y_max = torch.maximum(y.max(), y_max) if g.shape[0] else y_max
        ks = (_tinyprop_share(y, y_max, adapt, depth) * g.shape[1]).round()
    return ks.clamp(adapt.min_k, k_max).long(), y_max


def _sorted_topk(g: Tensor, k: int, kernels) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, vals, |vals|), (M, k) each, the k largest |g| of each row in descending order."""
    if kernels is None:
        top, idx = g.abs().topk(k, dim=1, sorted=True)
        return idx, g.gather(1, idx), top
    idx, vals = kernels.topk_rows(g, k)  # (M, k), unsorted: sort the k (cheap next to n)
    top, order = vals.abs().sort(dim=1, descending=True)
    return idx.gather(1, order), vals.gather(1, order), top


def _read(ks: Tensor, y_max: Tensor | None, record: KRecord, dt: torch.dtype) -> int:
    """The one host read of a call: the largest k (returned), the mean k and the largest error
    (into the record)."""
    if ks.numel() == 0:
        record.last_k = None
        return 1
    ym = y_max if y_max is not None else ks.new_zeros((), dtype=dt)
    big, total_k, ym = torch.stack([ks.max().to(dt), ks.sum().to(dt), ym]).tolist()
    if y_max is not None:
        record.y_max = ym
    record.last_k = total_k / ks.numel()
    return int(big)


def batch_k(scores: Tensor, k_max: int, adapt: AdaptiveK, record: KRecord) -> tuple[int, Tensor]:
    """The unified k, and its columns, from the (n,) column scores of a gradient (M, n) with
    ``k_max < n``: ``ops.column_scores``, the summed |g| of each column (under
    ``scope="global"`` summed over the ranks, so every rank computes the same k and columns).

    Returns ``(k, cols)``: ``cols`` (k,) sorted, the k columns with the largest scores.
    """
    top, cols = scores.topk(k_max, sorted=True)  # (k_max,), descending
    if adapt.rule == "mass":
        if adapt.measure == "square":
            k = _mass_count(top.square(), scores.square().sum(), adapt.share)
        else:
            k = _mass_count(top, scores.sum(), adapt.share)
        y_max = scores.new_zeros(())
    else:
        # The batch's error size: the sum over its rows (for a mean loss, whose g carries the
        # 1/M, the mean example's), the same on every rank with scope="global".
        y = scores.sum()
        y_max = torch.maximum(y, y.new_tensor(record.y_max))
        k = (_tinyprop_share(y, y_max, adapt, record.depth) * len(scores)).round()
    k = k.clamp(adapt.min_k, k_max)
    kk, ym = torch.stack([k.to(scores.dtype), y_max]).tolist()  # the one host read
    if adapt.rule == "tinyprop":
        record.y_max = ym
    kk = int(kk)
    record.last_k = float(kk)
    return kk, cols[:kk].sort().values
