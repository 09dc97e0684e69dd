"""Compiled CPU kernels (numba) for meAct's active-only linear map, registered as torch ops.

meAct (Sun et al., TKDE, "minimal effort activation") computes, for each example, only the
outputs of its *active* neurons; the others take a cached value. For ``z = x W^T + b`` with
``x`` (M, in), ``W`` (n, in), the active set of each row is given in CSR form:

    offsets (M + 1,) int64, non-decreasing, offsets[0] = 0, offsets[M] = nnz
    cols    (nnz,)   int64, the active columns of row i are cols[offsets[i]:offsets[i + 1]]

so each example may have its own number of active neurons. The three products:

* ``active_linear(x, W, b, offsets, cols, base) -> out`` (M, n): a copy of ``base`` with
  out[i, j] = W[j] . x[i] + b[j] at the active (i, j). O(nnz in) instead of O(M n in).
* ``active_linear_dx(offsets, cols, grad, W) -> dx`` (M, in): dx[i] = sum over active j of
  grad[i, j] W[j]; the other entries of ``grad`` (M, n) are never read.
* ``active_linear_dw(offsets, cols, grad, x) -> (dW, db)``: dW (n, in) = sum over active (i, j)
  of grad[i, j] x[i] in row j, db (n,) the sum of those grad[i, j]; rows no example activates
  are zero. The (i, j) pairs are counting-sorted by j first, so each row of dW is written by
  one task (no races) and exactly once.

Two helpers keep meAct's per-example bookkeeping out of PyTorch's boolean-mask ops (which
cost tens of microseconds each on a (B, n) batch here):

* ``select_active(share, threshold, cap) -> (offsets, cols)``: the active sets of rows of
  accumulations (B, n), as ``meprop.meact.active_mask`` defines them (share of the row's
  total >= threshold %; the ``cap`` largest, ties to the lower column; an all-zero row is all
  active), in CSR form with ascending columns.
* ``accumulate_active(share, total, grad, offsets, cols) -> (share', total')``: add |grad| at
  the active entries to accumulations kept as shares of their row's total ``total`` (B,):
  share' = (share * total + |grad|) / total', total' = total + sum of those |grad|.

Duplicate columns in a row add up (dx, dW) or are written twice with the same value (out);
out-of-range columns raise IndexError; malformed offsets raise ValueError. float32 and
float64, any strides (copied to contiguous where needed), M = 0 and nnz = 0 included.

Each is a ``torch.library.custom_op`` (``torch.ops.meprop.<name>``) with a fake implementation;
the plain functions of the same names skip the dispatcher (tens of microseconds per call) and
are what eager code calls. The dot products of the forward are summed in a vectorised order
(numba's ``reassoc`` fast-math flag only: NaN and inf keep their IEEE meaning), so they differ
from a GEMM's in the last bits. Kernels run in parallel (``prange``, numba's thread count set
to torch's) where the work is worth waking the threads, serially otherwise; numba's threading
layer is the one ``meprop.kernels.cpu`` picks (it is imported first for that). Compiled code
is cached on disk after the first run.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import torch
from torch import Tensor

from . import cpu as _cpu  # (first: it configures numba's threading layer)
from .checks import check_float, raise_bad

__all__ = [
    "available",
    "active_linear",
    "active_linear_dx",
    "active_linear_dw",
    "select_active",
    "accumulate_active",
    "warmup",
]

if _cpu.available():
    import numba
    from numba import prange
else:  # pragma: no cover - numba missing or broken
    numba = None
    prange = range

_ZERO = {torch.float32: np.float32(0), torch.float64: np.float64(0)}


def available() -> bool:
    """Whether numba imported, so these kernels can run."""
    return _cpu.available()


def _compile(fn, fastmath, parallel: bool):
    """njit with on-disk caching; without it where numba finds no cache directory."""
    if numba is None:  # pragma: no cover
        return fn
    opts = dict(nogil=True, parallel=parallel, fastmath=fastmath)
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # pragma: no cover - no cache locator (read-only install)
        return numba.njit(**opts)(fn)


def _renamed(fn, suffix: str):
    """A copy of ``fn`` under another qualname: numba's cache tells functions apart by
    qualname and signature only, so the serial and parallel builds need different names."""
    f = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix)
    f.__qualname__ = fn.__qualname__ + suffix
    return f


# Parallel builds only for work estimated above this many ns: a parallel launch costs ~5 us
# on an idle machine but ~85 us measured on this busy 2-core one (the workers must be
# scheduled), more than the whole selection or accumulation of an MNIST batch (~5 us).
_PAR_MIN_NS = 50_000


class _Kernel:
    """A kernel compiled twice (lazily, on first use): parallel over ``prange`` and serial.

    ``kernel(work_ns, *args)`` runs the parallel build when torch has several threads and the
    estimated serial work ``work_ns`` is worth a launch, else the serial one. numba's thread
    count follows torch's.
    """

    def __init__(self, fn, fastmath) -> None:
        self.parallel = _compile(fn, fastmath, parallel=True)
        self.serial = _compile(_renamed(fn, "_serial"), fastmath, parallel=False)

    def __call__(self, work_ns: float, *args):
        t = torch.get_num_threads()
        if t > 1 and work_ns >= _PAR_MIN_NS:
            if getattr(_tls, "threads", None) != t:  # numba's set_num_threads costs us
                numba.set_num_threads(max(1, min(t, numba.config.NUMBA_NUM_THREADS)))
                _tls.threads = t
            return self.parallel(*args)
        return self.serial(*args)


def _jit(fastmath):
    return lambda fn: _Kernel(fn, fastmath)


_tls = threading.local()


# Reductions (the forward's dot products) may be reordered to vectorise: ~10x faster here.
# The backward's loops are independent multiply-adds across columns and vectorise as written.
_DOT = {"reassoc", "contract"}
_AXPY = {"contract"}


# --------------------------------------------------------------------------------------------
# Kernels (numba). Shapes in comments; all arrays C-contiguous.


@lambda fn: _compile(fn, False, parallel=False)
def _by_column(offsets, cols, n):
    """Counting sort of the active (i, j) by column j in [0, n): O(nnz + n).

    Returns start (n + 1,) and ex (pairs,): the examples i with j active are
    ex[start[j]:start[j + 1]], in ascending order; and the number of out-of-range cols (left
    out).
    """
    m = offsets.shape[0] - 1
    start = np.zeros(n + 1, np.int64)
    bad = 0
    for p in range(offsets[m]):
        j = cols[p]
        if j < 0 or j >= n:
            bad += 1
        else:
            start[j + 1] += 1
    for j in range(n):
        start[j + 1] += start[j]
    cursor = start[:n].copy()
    ex = np.empty(start[n], np.int64)
    for i in range(m):
        for p in range(offsets[i], offsets[i + 1]):
            j = cols[p]
            if 0 <= j < n:
                ex[cursor[j]] = i
                cursor[j] += 1
    return start, ex, bad


@_jit(_DOT)
def _forward_impl(x, w, b, has_bias, offsets, cols, out, zero):
    """out (M, n) holds the base values on entry; writes out[i, j] = w[j] . x[i] (+ b[j]) at
    the active (i, j). x (M, in), w (n, in), b (n,). Returns the count of out-of-range cols.

    One task per neuron j: its row of W stays in L1 while it meets every example that has j
    active (four at a time), and the examples' rows of x (M in floats) stay in L2. Per example
    instead, each active pair would stream a row of W from L3: measured 10-50% slower.
    """
    n, d = w.shape
    start, ex, bad = _by_column(offsets, cols, n)
    for j in prange(n):
        wj = w[j]
        bj = b[j] if has_bias else zero
        q = start[j]
        end = start[j + 1]
        while q + 4 <= end:
            i0, i1, i2, i3 = ex[q], ex[q + 1], ex[q + 2], ex[q + 3]
            x0, x1, x2, x3 = x[i0], x[i1], x[i2], x[i3]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for c in range(d):
                wc = wj[c]
                s0 += wc * x0[c]
                s1 += wc * x1[c]
                s2 += wc * x2[c]
                s3 += wc * x3[c]
            out[i0, j] = s0 + bj
            out[i1, j] = s1 + bj
            out[i2, j] = s2 + bj
            out[i3, j] = s3 + bj
            q += 4
        while q < end:
            i = ex[q]
            xi = x[i]
            s = zero
            for c in range(d):
                s += wj[c] * xi[c]
            out[i, j] = s + bj
            q += 1
    return bad


@_jit(_AXPY)
def _dx_impl(offsets, cols, g, w, out):
    """out (M, in) = sum over active j of g[i, j] * w[j]; g (M, n), w (n, in)."""
    m, d = out.shape
    n = w.shape[0]
    bad = 0
    for i in prange(m):
        o = out[i]
        for c in range(d):
            o[c] = 0
        p = offsets[i]
        end = offsets[i + 1]
        while p < end:
            # Four rows of W per sweep over out[i]: half the loads and stores of out[i].
            if p + 4 <= end:
                j0, j1, j2, j3 = cols[p], cols[p + 1], cols[p + 2], cols[p + 3]
                if min(j0, j1, j2, j3) >= 0 and max(j0, j1, j2, j3) < n:
                    v0, v1, v2, v3 = g[i, j0], g[i, j1], g[i, j2], g[i, j3]
                    w0, w1, w2, w3 = w[j0], w[j1], w[j2], w[j3]
                    for c in range(d):
                        o[c] += (v0 * w0[c] + v1 * w1[c]) + (v2 * w2[c] + v3 * w3[c])
                    p += 4
                    continue
            j = cols[p]
            p += 1
            if j < 0 or j >= n:
                bad += 1
                continue
            v = g[i, j]
            wj = w[j]
            for c in range(d):
                o[c] += v * wj[c]
    return bad


@_jit(_AXPY)
def _dw_impl(offsets, cols, g, x, dw, db, zero):
    """dw (n, in), db (n,): the weight and bias gradients from the active (i, j) only.

    The pairs sorted by column j (``_by_column``), then one task per row of dw.
    """
    d = x.shape[1]
    n = dw.shape[0]
    start, ex, bad = _by_column(offsets, cols, n)
    for j in prange(n):
        o = dw[j]
        for c in range(d):
            o[c] = 0
        sb = zero
        q = start[j]
        end = start[j + 1]
        while q + 4 <= end:
            i0, i1, i2, i3 = ex[q], ex[q + 1], ex[q + 2], ex[q + 3]
            v0, v1, v2, v3 = g[i0, j], g[i1, j], g[i2, j], g[i3, j]
            x0, x1, x2, x3 = x[i0], x[i1], x[i2], x[i3]
            for c in range(d):
                o[c] += (v0 * x0[c] + v1 * x1[c]) + (v2 * x2[c] + v3 * x3[c])
            sb += (v0 + v1) + (v2 + v3)
            q += 4
        while q < end:
            i = ex[q]
            v = g[i, j]
            xi = x[i]
            for c in range(d):
                o[c] += v * xi[c]
            sb += v
            q += 1
        db[j] = sb
    return bad


@_jit(_DOT)
def _count_impl(share, hundred, thr, cap, counts, raw, lims):
    """Pass 1 of select_active: counts[i] = how many of row i are active after the cap,
    raw[i] before it; lims[i] = the row's bound (total * thr)."""
    m, n = share.shape
    for i in prange(m):
        row = share[i]
        tot = hundred - hundred  # a zero of share's dtype (float32 stays float32)
        for j in range(n):
            tot += row[j]
        lim = tot * thr
        c = 0
        for j in range(n):
            c += row[j] * hundred >= lim  # share >= thr %, as products (0 >= 0 in a zero row)
        lims[i] = lim
        raw[i] = c
        counts[i] = min(c, cap) if 0 < cap and tot > 0 else c


@_jit(False)
def _fill_impl(share, hundred, lims, raw, offsets, cols):
    """Pass 2 of select_active: the active columns of row i into cols[offsets[i]:...]."""
    m, n = share.shape
    for i in prange(m):
        row = share[i]
        lim = lims[i]
        p = offsets[i]
        end = offsets[i + 1]
        c = raw[i]
        if c <= end - p:  # no cap at work (branches beat branch-free stores here: 2x)
            for j in range(n):
                if row[j] * hundred >= lim:
                    cols[p] = j
                    p += 1
        else:  # the cap: the end - p largest candidates; a stable sort keeps the lower
            # columns first among equals (candidates are in ascending column order)
            cand = np.empty(c, np.int64)
            neg = np.empty(c, share.dtype)
            t = 0
            for j in range(n):
                if row[j] * hundred >= lim:
                    cand[t] = j
                    neg[t] = -row[j]
                    t += 1
            keep = np.sort(cand[np.argsort(neg, kind="mergesort")[: end - p]])
            for t in range(end - p):
                cols[p + t] = keep[t]


@_jit(False)
def _accumulate_impl(share, total, g, offsets, cols):
    """In place: share (B, n) and total (B,) take |g| (B, n) at the active entries."""
    m, n = share.shape
    for i in prange(m):
        s = 0.0
        for p in range(offsets[i], offsets[i + 1]):
            s += abs(g[i, cols[p]])
        old = total[i]
        new = old + s
        if new > 0:
            scale = old / new
            for j in range(n):
                share[i, j] *= scale
            for p in range(offsets[i], offsets[i + 1]):
                j = cols[p]
                share[i, j] += abs(g[i, j]) / new
        total[i] = new


# --------------------------------------------------------------------------------------------
# Python entry points (no dispatcher). Outputs are numpy-allocated and shared via from_numpy.


def _array(name: str, t: Tensor, ndim: int) -> np.ndarray:
    """A float32/float64 CPU tensor of rank ``ndim`` as a C-contiguous numpy array."""
    t = check_float(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.detach().numpy()


def _csr(offsets: Tensor, cols: Tensor, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked numpy views of the active sets of m rows."""
    for name, t in (("offsets", offsets), ("cols", cols)):
        if t.dtype != torch.int64 or not t.is_cpu or t.dim() != 1:
            raise TypeError(
                f"{name} must be a 1-D int64 CPU tensor, got {t.dtype} {tuple(t.shape)} "
                f"on {t.device}"
            )
    off = offsets.contiguous().numpy()
    if off.shape[0] != m + 1:
        raise ValueError(f"offsets must have M + 1 = {m + 1} entries, got {off.shape[0]}")
    if off[0] != 0 or off[-1] != cols.shape[0] or (m and np.any(off[1:] < off[:-1])):
        raise ValueError(
            f"offsets must rise from 0 to len(cols) = {cols.shape[0]}, got "
            f"{off[0]}..{off[-1]}{' (decreasing somewhere)' if np.any(off[1:] < off[:-1]) else ''}"
        )
    return off, cols.contiguous().numpy()


def _same_dtype(**arrays: np.ndarray) -> None:
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"dtypes must match, got {dtypes}")


def active_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, cols: Tensor, base: Tensor
) -> Tensor:
    """``base`` (M, n) with its active entries replaced by ``x @ weight.T + bias``.

    x (M, in), weight (n, in), bias (n,) or None; the active (i, j) are given by ``offsets``
    (M + 1,) and ``cols`` (nnz,) (see the module docstring).
    """
    xn, wn, basen = _array("x", x, 2), _array("weight", weight, 2), _array("base", base, 2)
    m, d = xn.shape
    n = wn.shape[0]
    if wn.shape[1] != d or basen.shape != (m, n):
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}, base "
            f"{tuple(base.shape)} (want x (M, in), weight (n, in), base (M, n))"
        )
    bn = np.empty(0, wn.dtype) if bias is None else _array("bias", bias, 1)
    if bias is not None and bn.shape[0] != n:
        raise ValueError(f"bias must have n = {n} entries, got {tuple(bias.shape)}")
    _same_dtype(x=xn, weight=wn, base=basen, bias=bn)
    off, cn = _csr(offsets, cols, m)
    out = basen.copy()
    if cn.shape[0]:
        work = cn.shape[0] * d / 8  # ns: ~8 multiply-adds per ns
        bad = _forward_impl(work, xn, wn, bn, bias is not None, off, cn, out, _ZERO[x.dtype])
        raise_bad(bad, n, "cols")
    return torch.from_numpy(out)


def active_linear_dx(offsets: Tensor, cols: Tensor, grad: Tensor, weight: Tensor) -> Tensor:
    """dx (M, in): dx[i] = sum of grad[i, j] * weight[j] over the active j of row i.

    grad (M, n) is read at the active entries only; weight (n, in).
    """
    gn, wn = _array("grad", grad, 2), _array("weight", weight, 2)
    if gn.shape[1] != wn.shape[0]:
        raise ValueError(f"grad {tuple(grad.shape)} and weight {tuple(weight.shape)} disagree on n")
    _same_dtype(grad=gn, weight=wn)
    off, cn = _csr(offsets, cols, gn.shape[0])
    out = np.empty((gn.shape[0], wn.shape[1]), wn.dtype)
    if out.size:
        work = cn.shape[0] * wn.shape[1] / 8
        raise_bad(_dx_impl(work, off, cn, gn, wn, out), wn.shape[0], "cols")
    return torch.from_numpy(out)


def active_linear_dw(
    offsets: Tensor, cols: Tensor, grad: Tensor, x: Tensor
) -> tuple[Tensor, Tensor]:
    """(dW (n, in), db (n,)) from the active entries of grad (M, n) and x (M, in).

    Rows of dW (and entries of db) that no example activates are zero.
    """
    gn, xn = _array("grad", grad, 2), _array("x", x, 2)
    if gn.shape[0] != xn.shape[0]:
        raise ValueError(f"grad {tuple(grad.shape)} and x {tuple(x.shape)} disagree on M")
    _same_dtype(grad=gn, x=xn)
    off, cn = _csr(offsets, cols, gn.shape[0])
    n = gn.shape[1]
    dw = np.empty((n, xn.shape[1]), xn.dtype)
    db = np.empty(n, xn.dtype)
    if n:
        work = (cn.shape[0] + n) * xn.shape[1] / 8
        raise_bad(_dw_impl(work, off, cn, gn, xn, dw, db, _ZERO[x.dtype]), n, "cols")
    return torch.from_numpy(dw), torch.from_numpy(db)


def select_active(share: Tensor, threshold: float, cap: int = 0) -> tuple[Tensor, Tensor]:
    """The active sets of the rows of ``share`` (B, n) >= 0, as offsets (B + 1,), cols (nnz,).

    A column is active when share * 100 >= (row sum) * threshold; with ``cap`` > 0 at most the
    ``cap`` largest of those stay (ties: the lower column); a row summing to 0 is all active.
    Columns ascend within a row. Matches ``meprop.meact.active_mask`` (up to rounding of the
    row sums exactly at the threshold).
    """
    sn = _array("share", share, 2)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ValueError(f"cap must be an int >= 0, got {cap!r}")
    m, n = sn.shape
    counts = np.zeros(m, np.int64)
    raw = np.empty(m, np.int64)
    lims = np.empty(m, sn.dtype)
    offsets = np.zeros(m + 1, np.int64)
    if m and n:
        dtype = sn.dtype.type
        _count_impl(m * n / 4, sn, dtype(100.0), dtype(threshold), cap, counts, raw, lims)
        np.cumsum(counts, out=offsets[1:])
    cols = np.empty(offsets[-1], np.int64)
    if cols.shape[0]:
        _fill_impl(m * n / 4, sn, dtype(100.0), lims, raw, offsets, cols)
    return torch.from_numpy(offsets), torch.from_numpy(cols)


def accumulate_active(
    share: Tensor, total: Tensor, grad: Tensor, offsets: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """New (share (B, n), total (B,)) after adding |grad| (B, n) at the active entries.

    share holds accumulations as shares of their row's ``total``; float32 or float64 (grad
    may have another float dtype). Inactive entries of grad are never read.
    """
    sn, tn = _array("share", share, 2).copy(), _array("total", total, 1).copy()
    gn = _array("grad", grad, 2)
    if gn.shape != sn.shape or tn.shape[0] != sn.shape[0] or tn.dtype != sn.dtype:
        raise ValueError(
            f"want share and grad (B, n), total (B,) of share's dtype; got share "
            f"{tuple(share.shape)} {share.dtype}, grad {tuple(grad.shape)}, total "
            f"{tuple(total.shape)} {total.dtype}"
        )
    off, cn = _csr(offsets, cols, sn.shape[0])
    if cn.shape[0] and (cn.min() < 0 or cn.max() >= sn.shape[1]):
        raise_bad(int(((cn < 0) | (cn >= sn.shape[1])).sum()), sn.shape[1], "cols")
    if sn.shape[0]:
        _accumulate_impl(sn.size / 4, sn, tn, gn, off, cn)
    return torch.from_numpy(sn), torch.from_numpy(tn)


# --------------------------------------------------------------------------------------------
# torch ops: torch.ops.meprop.<name>, with fake implementations for torch.compile.

_active_linear_op = torch.library.custom_op(
    "meprop::active_linear", active_linear, mutates_args=(), device_types="cpu"
)
_active_linear_dx_op = torch.library.custom_op(
    "meprop::active_linear_dx", active_linear_dx, mutates_args=(), device_types="cpu"
)
_active_linear_dw_op = torch.library.custom_op(
    "meprop::active_linear_dw", active_linear_dw, mutates_args=(), device_types="cpu"
)


_select_active_op = torch.library.custom_op(
    "meprop::select_active", select_active, mutates_args=(), device_types="cpu"
)
_accumulate_active_op = torch.library.custom_op(
    "meprop::accumulate_active", accumulate_active, mutates_args=(), device_types="cpu"
)


@_active_linear_op.register_fake
def _(x, weight, bias, offsets, cols, base):
    return base.new_empty(base.shape)


@_active_linear_dx_op.register_fake
def _(offsets, cols, grad, weight):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@_active_linear_dw_op.register_fake
def _(offsets, cols, grad, x):
    return x.new_empty((grad.shape[1], x.shape[1])), x.new_empty((grad.shape[1],))


@_select_active_op.register_fake
def _(share, threshold, cap=0):
    nnz = torch.library.get_ctx().new_dynamic_size()  # data-dependent, <= B n
    return share.new_empty((share.shape[0] + 1,), dtype=torch.int64), share.new_empty(
        (nnz,), dtype=torch.int64
    )


@_accumulate_active_op.register_fake
def _(share, total, grad, offsets, cols):
    return share.new_empty(share.shape), total.new_empty(total.shape)


def warmup(dtypes=(torch.float32, torch.float64)) -> None:
    """Compile (or load from numba's cache) the kernels for ``dtypes``."""
    if numba is None:
        return
    for dtype in dtypes:
        x, w, b = torch.ones(2, 3, dtype=dtype), torch.ones(5, 3, dtype=dtype), torch.ones(5)
        offsets, cols = torch.tensor([0, 4, 5]), torch.tensor([0, 1, 2, 3, 4])
        g = torch.ones(2, 5, dtype=dtype)
        active_linear(x, w, b.to(dtype), offsets, cols, torch.zeros(2, 5, dtype=dtype))
        active_linear(x, w, None, offsets, cols, torch.zeros(2, 5, dtype=dtype))
        active_linear_dx(offsets, cols, g, w)
        active_linear_dw(offsets, cols, g, x)
        select_active(g, 10.0, 0)
        select_active(g, 10.0, 2)
        accumulate_active(g.abs(), torch.ones(2, dtype=dtype), g, offsets, cols)
