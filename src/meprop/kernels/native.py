"""C++ CPU kernels (``native.cpp``) for meProp's backward, compiled on first use, via ctypes.

The same operations as the numba kernels of ``meprop.kernels.cpu`` (``topk_rows``,
``rows_matmul``, ``rows_outer``, ``rows_outer_dense``, same semantics, same errors), plus two
fused entry points that run a layer's whole sparse backward in one call:

* ``per_example_backward(g, x, weight, k, ...)``: per-row top-k, dx, dW (dense or row-compact)
  and the bias gradient.
* ``unified_backward(g, x, weight, k, ...)``: the k columns with the largest sum of |g|, then
  the same products from the compacted columns.

Why C++ next to numba, measured with ``benchmarks/bench_kernels.py --threads 1`` (AMD EPYC,
AVX-512; M=100 rows, n=in=500, k=20): the top-k is 2.4x faster (30 vs 70 us: AVX-512
compares into candidate lists, a branch-free exact selection among them), dx is on par (58 vs
62 us: both stream W's rows from L2 at ~17 GFMA/s), dW 1.2x (72 vs 84 us); the three
together 1.36x (160 vs 217 us), the fused call 1.46x (149 us). At n=in=4096, M=32, k=32 the
three take 1.7 ms instead of 9.2 ms, mostly from reusing dense dW buffers (``pool.GradPool``)
and streaming stores. One ctypes call per backward replaces three numba calls with their
array conversions, and OpenMP runs on the runtime torch already loaded (libgomp, same
soname), so the kernels share torch's thread pool instead of waking a second one.

The library is compiled on first use and cached (``meprop.kernels.build``: flags, -march,
cache, ``available()``, ``build_info()``; re-exported here); large dW outputs come from the
gradient pool (``meprop.kernels.pool``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import build, pool
from .build import (
    SOURCE,
    available,
    build_error,
    build_info,
    cache_dir,
    cpu_supports,
    march,
    use_build,
)
from .checks import check_float, check_n, check_pairs, raise_bad, supports
from .pool import clear_grad_pool

__all__ = [
    "available",
    "build_error",
    "build_info",
    "march",
    "use_build",
    "supports",
    "topk_rows",
    "rows_matmul",
    "rows_outer",
    "rows_outer_dense",
    "top_columns",
    "channel_topk_mask",
    "conv_rows",
    "per_example_backward",
    "unified_backward",
    "row_adam",
    "clear_grad_pool",
    # (from meprop.kernels.build, for the callers that read them here)
    "SOURCE",
    "cache_dir",
    "cpu_supports",
]

FUSED = True  # has per_example_backward and unified_backward (meprop.ops looks for this)

# Parallel regions only above ~30 us of serial work: waking the pool costs microseconds, and
# on a loaded machine a region waits for its slowest (descheduled) thread.
_PAR_MIN_ENTRIES = 1 << 16  # top-k: about 0.5 ns per entry
_PAR_MIN_FMAS = 1 << 19  # products: about 20 multiply-adds per ns
_PAR_MIN_ADAM = 1 << 16  # Adam's step: about 1 ns per entry (memory-bound)


# --------------------------------------------------------------------------------------------
# Helpers


def _threads(work: int, minimum: int) -> int:
    t = torch.get_num_threads()
    return t if t > 1 and work >= minimum else 1


def _compact(rows: Tensor, dw_rows: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The first r of the rows allocated for the worst case (cap); copied when that would keep
    more than twice the memory needed alive."""
    cap = rows.shape[0]
    rows, dw_rows = rows[:r], dw_rows[:r]
    if 2 * r < cap:
        rows, dw_rows = rows.clone(), dw_rows.clone()
    return rows, dw_rows


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------------------------
# The four operations of meprop.kernels.cpu


def topk_rows(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest-magnitude entries of each row of ``g`` (M, n), 1 <= k <= n.

    Returns ``idx`` (M, k) int64 column numbers and ``vals = g.gather(1, idx)``; the order
    within a row is unspecified. NaN ranks above +-inf, which ranks above every number; among
    equal magnitudes the lower columns win.
    """
    g = check_float("g", g)
    if g.dim() != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    m, n = g.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")
    idx = torch.empty(m, k, dtype=torch.int64)
    vals = torch.empty(m, k, dtype=g.dtype)
    if m:
        nt = _threads(m * n, _PAR_MIN_ENTRIES)
        build.kernel("topk_rows", g.dtype)(
            g.data_ptr(), m, n, k, idx.data_ptr(), vals.data_ptr(), nt
        )
    return idx, vals


def rows_matmul(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``dx`` (M, in): dx[i] = sum_j vals[i, j] * weight[idx[i, j]] for idx, vals (M, k) and
    weight (n, in); i.e. g~ @ weight for the sparse g~ (M, n) that (idx, vals) describe."""
    i, v, w = check_pairs(idx, vals, weight, "weight", -1)
    (m, k), (n, d) = i.shape, w.shape
    out = torch.empty(m, d, dtype=w.dtype)
    if m and d:
        nt = _threads(m * k * d, _PAR_MIN_FMAS)
        status = build.kernel("rows_matmul", w.dtype)(
            i.data_ptr(), v.data_ptr(), m, k, w.data_ptr(), n, d, out.data_ptr(), nt
        )
        raise_bad(-status, n)
    return out


def rows_outer(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """g~^T @ x in row-compact form, for the sparse g~ (M, n) that idx, vals (M, k) describe
    and x (M, in).

    Returns ``rows`` (R,) int64, the sorted distinct values of idx, and ``dw_rows`` (R, in):
    dw_rows[r] = sum of vals[i, j] * x[i] over the (i, j) with idx[i, j] == rows[r].
    """
    i, v, xc = check_pairs(idx, vals, x, "x", idx.shape[0])
    check_n(n)
    (m, k), d = i.shape, xc.shape[1]
    cap = min(n, m * k)  # R <= cap
    rows = torch.empty(cap, dtype=torch.int64)
    out = pool.output(cap, d, xc.dtype)
    r = build.kernel("rows_outer", xc.dtype)(
        i.data_ptr(), v.data_ptr(), m, k, xc.data_ptr(), d, n, 3, out.data_ptr(), rows.data_ptr(),
        _threads(m * k * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    raise_bad(-r, n)
    return _compact(rows, out, r)


def rows_outer_dense(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
    """g~^T @ x as a dense (n, in) tensor, zero in the rows idx never names; see rows_outer."""
    i, v, xc = check_pairs(idx, vals, x, "x", idx.shape[0])
    check_n(n)
    (m, k), d = i.shape, xc.shape[1]
    out, entry, _, mode = pool.dense_dw(n, d, xc.dtype, m * k)
    rows = torch.empty(n if entry is not None else 0, dtype=torch.int64)
    if n and d:
        r = build.kernel("rows_outer", xc.dtype)(
            i.data_ptr(), v.data_ptr(), m, k, xc.data_ptr(), d, n, mode, out.data_ptr(),
            rows.data_ptr() if entry is not None else None, _threads(m * k * d, _PAR_MIN_FMAS),
        )  # fmt: skip
        raise_bad(-r, n)
        pool.POOL.written(entry, rows[:r])
    return out


def top_columns(g: Tensor, k: int) -> Tensor:
    """The unified selection: the k columns of ``g`` (M, n) with the largest sum of |g| (NaN
    ranks highest), sorted; as ``meprop.ops.select_columns``, 1 <= k <= n."""
    g = check_float("g", g)
    if g.dim() != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    m, n = g.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")
    cols = torch.empty(k, dtype=torch.int64)
    build.kernel("top_columns", g.dtype)(g.data_ptr(), m, n, k, cols.data_ptr())
    return cols


def channel_topk_mask(g: Tensor, k: int) -> Tensor:
    """Per-position channel selection of a convolution's output gradient ``g`` (B, C, H', W'),
    1 <= k < C: ``keep`` (B, C, H', W') bool, True for the k channels of largest |g| at each
    (example, position). NaN ranks highest; among equal magnitudes the lower channels win."""
    g = check_float("g", g)
    if g.dim() != 4:
        raise ValueError(f"g must be (B, C, H', W'), got shape {tuple(g.shape)}")
    b, c, h, w = g.shape
    if not 1 <= k < c:
        raise ValueError(f"k must be in [1, C) = [1, {c}), got k={k}")
    keep = torch.empty(g.shape, dtype=torch.bool)
    if keep.numel():
        nt = _threads(g.numel(), _PAR_MIN_ENTRIES)
        build.kernel("channel_topk_mask", g.dtype)(
            g.data_ptr(), b, c, h * w, k, keep.data_ptr(), nt
        )
    return keep


def conv_rows(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    idx: Tensor,
    padding: tuple[int, int],
    need_dx: bool,
    need_dw: bool,
    keep: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """A stride-1, dilation-1, groups-1 convolution's backward from each example's kept output
    channels only (``SparseConv2d``'s "direct" form): ``g`` (B, C_out, H', W'), ``x`` (B, C_in,
    H, W), ``weight`` (C_out, C_in, kh, kw), all contiguous of one float dtype; ``idx`` (K,)
    the channels every example keeps (unified) or (B, K) each example's; ``keep`` (B, K) bool or
    None: which slots count (adaptive k). Returns (dx or None, dW or None), equal up to
    summation order to the dense backward of g masked to those channels."""
    g, x, weight = (check_float(n, t) for n, t in (("g", g), ("x", x), ("weight", weight)))
    if not (g.dtype == x.dtype == weight.dtype):
        raise ValueError(f"g, x and weight must share a dtype, got {g.dtype}, {x.dtype}, "
                         f"{weight.dtype}")  # fmt: skip
    b, ci, h, w = x.shape
    co, ci_w, kh, kw = weight.shape
    ph, pw = padding
    want = (b, co, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)
    if ci_w != ci or tuple(g.shape) != want:
        raise ValueError(
            f"shapes do not fit a stride-1 convolution with padding {padding}: x {tuple(x.shape)}"
            f", weight {tuple(weight.shape)}, g {tuple(g.shape)} (expected {want})"
        )
    idx = idx.contiguous()
    kk = idx.shape[-1]
    keep_u8 = None if keep is None else keep.contiguous().view(torch.uint8)
    dx = torch.empty(x.shape, dtype=x.dtype) if need_dx else None
    dw = torch.empty(weight.shape, dtype=x.dtype) if need_dw else None
    if b and (need_dx or need_dw):
        nt = _threads(2 * b * kk * ci * kh * kw * want[2] * want[3], _PAR_MIN_FMAS)
        r = build.kernel("conv_rows", g.dtype)(
            x.data_ptr(), weight.data_ptr(), g.data_ptr(), idx.data_ptr(),
            kk if idx.dim() == 2 else 0, _ptr(keep_u8), b, ci, h, w, co, kh, kw, ph, pw, kk,
            _ptr(dx), _ptr(dw), nt,
        )  # fmt: skip
        if r < 0:
            raise_bad(-r, co)
    elif need_dw:
        dw.zero_()
    return dx, dw


# --------------------------------------------------------------------------------------------
# Fused backward of one linear layer


class _RowsDw:
    """The dW buffer of a per-example backward (``dw``: "dense", "sparse" or None) with at most
    ``pairs`` (row, example) pairs: the kernel's dw_mode, output, rows and stale-row arguments,
    and the result it leaves (a dense tensor from the pool, or row-compact (rows, dw_rows))."""

    def __init__(self, dw: str | None, n: int, d: int, dtype: torch.dtype, pairs: int) -> None:
        self.rows = self.out = self.entry = self.stale = None
        self.mode = 0
        if dw == "dense":
            self.out, self.entry, self.stale, self.mode = pool.dense_dw(
                n, d, dtype, pairs, defer=True
            )
            if self.entry is not None:  # the rows written, for the pool
                self.rows = torch.empty(n, dtype=torch.int64)
        elif dw == "sparse":
            cap = min(n, pairs)
            self.rows, self.out = torch.empty(cap, dtype=torch.int64), pool.output(cap, d, dtype)
            self.mode = 3

    def args(self) -> tuple:
        """dw_mode, out, rows, stale, nstale: the kernel's arguments."""
        nstale = 0 if self.stale is None else self.stale.numel()
        return self.mode, _ptr(self.out), _ptr(self.rows), _ptr(self.stale), nstale

    def result(self, r: int):
        """dW after the kernel touched ``r`` rows."""
        if self.mode == 3:
            return _compact(self.rows, self.out, r)
        if self.entry is not None:
            pool.POOL.written(self.entry, self.rows[:r])
        return self.out


def per_example_backward(
    g: Tensor, x: Tensor, weight: Tensor, k: int, need_dx: bool, dw: str | None, need_db: bool
):
    """meProp's per-example backward of ``z = x W^T + b`` in one call, 1 <= k < n.

    Args:
        g: output gradient (M, n); x: input (M, in); weight: (n, in); all of one float dtype.
        dw: ``"dense"`` (n, in), ``"sparse"`` (row-compact) or None.

    Returns ``(idx, vals, dx, dw, db)``: the selection (M, k) each; dx (M, in) or None; dW as a
    dense tensor, as ``(rows (R,), dw_rows (R, in))`` or None; db = g.sum(0) (n,) or None.
    """
    m, n = g.shape
    d = weight.shape[1]
    dtype = g.dtype
    idx = torch.empty(m, k, dtype=torch.int64)
    vals = torch.empty(m, k, dtype=dtype)
    dx = torch.empty(m, d, dtype=dtype) if need_dx else None
    db = torch.empty(n, dtype=dtype) if need_db else None
    buf = _RowsDw(dw, n, d, dtype, m * k)
    r = build.kernel("per_example", dtype)(
        g.data_ptr(), m, n, k, x.data_ptr(), weight.data_ptr(), d, idx.data_ptr(),
        vals.data_ptr(), _ptr(dx), *buf.args(), _ptr(db), _threads(m * n, _PAR_MIN_ENTRIES),
        _threads(m * k * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    return idx, vals, dx, buf.result(r), db


def per_example_backward_var(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    k_max: int,
    adapt,
    y_max: float,
    depth: int,
    need_dx: bool,
    dw: str | None,
    need_db: bool,
):
    """``per_example_backward`` with a k per row (``adapt``: a ``meprop.AdaptiveK``), 1 <=
    k_max < n: the k's of ``meprop.adaptive`` (TinyProp's from ``y_max``, the largest error seen
    so far, and the layer's ``depth``; or the mass rule's), computed in the kernel. The products
    read each row's kept entries only.

    Returns ``(idx, vals, ks, y_max, dx, dw, db)``: idx, vals (M, k_max), row i's ``ks[i]``
    kept entries first, then padding (value 0); ks (M,) int64; the updated largest error; the
    rest as ``per_example_backward``.
    """
    m, n = g.shape
    d = weight.shape[1]
    dtype = g.dtype
    idx = torch.empty(m, k_max, dtype=torch.int64)
    vals = torch.empty(m, k_max, dtype=dtype)
    ks = torch.empty(m, dtype=torch.int64)
    tinyprop = adapt.rule == "tinyprop"
    span = adapt.s_max - adapt.s_min
    tp = torch.tensor([adapt.s_min, span, adapt.damping**depth], dtype=dtype)
    ym = torch.tensor([y_max], dtype=dtype)
    dx = torch.empty(m, d, dtype=dtype) if need_dx else None
    db = torch.empty(n, dtype=dtype) if need_db else None
    buf = _RowsDw(dw, n, d, dtype, m * k_max)
    r = build.kernel("per_example_var", dtype)(
        g.data_ptr(), m, n, k_max, 2 if tinyprop else 1, adapt.min_k, adapt.share,
        int(adapt.measure == "square"), tp.data_ptr(), ym.data_ptr(), x.data_ptr(),
        weight.data_ptr(), d, idx.data_ptr(), vals.data_ptr(), ks.data_ptr(), _ptr(dx),
        *buf.args(), _ptr(db),
        _threads(m * n, _PAR_MIN_ENTRIES), _threads(m * k_max * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    return idx, vals, ks, ym.item(), dx, buf.result(r), db


def unified_backward(
    g: Tensor, x: Tensor, weight: Tensor, k: int, need_dx: bool, dw: str | None, need_db: bool
):
    """meProp's unified (mini-batch) backward in one call, 1 <= k < n: the k columns of ``g``
    (M, n) with the largest sum of |g| (NaN ranks highest), then the compacted products.

    Returns ``(cols, gc, dx, dw, db)``: cols (k,) sorted, gc = g[:, cols] (M, k); dx (M, in)
    or None; dW dense (n, in), as ``(cols, dw_rows (k, in))`` or None; db = g.sum(0) or None.
    """
    m, n = g.shape
    d = weight.shape[1]
    dtype = g.dtype
    cols = torch.empty(k, dtype=torch.int64)
    gc = torch.empty(m, k, dtype=dtype)
    dx = torch.empty(m, d, dtype=dtype) if need_dx else None
    db = torch.empty(n, dtype=dtype) if need_db else None
    out = entry = stale = None
    mode = 0
    if dw == "dense":
        out, entry, stale, mode = pool.dense_dw(n, d, dtype, k, defer=True)
    elif dw == "sparse":
        out, mode = pool.output(k, d, dtype), 3
    build.kernel("unified", dtype)(
        g.data_ptr(), m, n, k, x.data_ptr(), weight.data_ptr(), d, cols.data_ptr(),
        gc.data_ptr(), _ptr(dx), mode, _ptr(out), _ptr(stale),
        0 if stale is None else stale.numel(), _ptr(db), _threads(m * k * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    if mode == 3:
        out = (cols, out)
    pool.POOL.written(entry, cols)
    return cols, gc, dx, out, db


def row_adam(
    p: Tensor,
    m: Tensor,
    v: Tensor,
    rows: Tensor | None,
    g: Tensor,
    d: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
) -> bool:
    """Adam's step ``step`` (1, 2, ...) in place on the rows ``rows`` (R,) of ``p``, ``m`` and
    ``v`` (contiguous, one float dtype, read as rows of ``d`` entries), whose gradient is ``g``
    (R rows of d, contiguous); ``rows`` None: every row. The formula is torch.optim.Adam's
    (``weight_decay`` adds ``weight_decay * p`` to the gradient). Returns False, having written
    nothing, where ``rows`` are not strictly increasing row numbers of ``p`` (coalesce first)."""
    b1, b2 = betas
    bc1 = 1.0 - b1**step
    bc2_sqrt = (1.0 - b2**step) ** 0.5
    nr = g.numel() // d
    status = build.kernel("row_adam", p.dtype)(
        p.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel() // d, d, _ptr(rows), nr,
        g.data_ptr(), lr, b1, b2, eps, weight_decay, bc1, bc2_sqrt,
        _threads(nr * d, _PAR_MIN_ADAM),
    )  # fmt: skip
    return status >= 0
