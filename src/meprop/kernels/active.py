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

Duplicate columns in a row add up (dx, dW) or are written twice with the same value (out);
out-of-range columns raise IndexError; malformed offsets raise ValueError. float32 and
float64, any strides (copied to contiguous where needed), M = 0 and nnz = 0 included.

Each is a ``torch.library.custom_op`` (``torch.ops.meprop.<name>``) with a fake implementation;
the plain functions of the same names skip the dispatcher (tens of microseconds per call) and
are what eager code calls. The dot products of the forward are summed in a vectorised order
(numba's ``reassoc`` fast-math flag only: NaN and inf keep their IEEE meaning), so they differ
from a GEMM's in the last bits. Kernels run in parallel over rows (``prange``) with numba's
thread count set to torch's; numba's threading layer is the one ``meprop.kernels.cpu`` picks
(it is imported first for that). Compiled code is cached on disk after the first run.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from . import cpu as _cpu  # (first: it configures numba's threading layer)

__all__ = ["available", "active_linear", "active_linear_dx", "active_linear_dw", "warmup"]

if _cpu.available():
    import numba
    from numba import prange
else:  # pragma: no cover - numba missing or broken
    numba = None
    prange = range

_DTYPES = (torch.float32, torch.float64)
_ZERO = {torch.float32: np.float32(0), torch.float64: np.float64(0)}


def available() -> bool:
    """Whether numba imported, so these kernels can run."""
    return _cpu.available()


def _jit(fastmath):
    def wrap(fn):
        if numba is None:  # pragma: no cover
            return fn
        opts = dict(nogil=True, parallel=True, fastmath=fastmath)
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError:  # pragma: no cover - no cache locator (read-only install)
            return numba.njit(**opts)(fn)

    return wrap


# Reductions (the forward's dot products) may be reordered to vectorise: ~10x faster here.
# The backward's loops are independent multiply-adds across columns and vectorise as written.
_DOT = {"reassoc", "contract"}
_AXPY = {"contract"}


# --------------------------------------------------------------------------------------------
# Kernels (numba). Shapes in comments; all arrays C-contiguous.


@_jit(_DOT)
def _forward_impl(x, w, b, has_bias, offsets, cols, out, zero):
    """out (M, n) holds the base values on entry; writes out[i, j] = w[j] . x[i] (+ b[j]) at
    the active (i, j). x (M, in), w (n, in), b (n,). Returns the count of out-of-range cols."""
    m, d = x.shape
    n = w.shape[0]
    bad = 0
    for i in prange(m):
        xi = x[i]
        p = offsets[i]
        end = offsets[i + 1]
        # Four rows of W per sweep over x[i]: x[i] is loaded once per four dot products.
        while p + 4 <= end:
            j0, j1, j2, j3 = cols[p], cols[p + 1], cols[p + 2], cols[p + 3]
            if min(j0, j1, j2, j3) < 0 or max(j0, j1, j2, j3) >= n:
                break  # let the one-at-a-time loop below count the bad ones
            w0, w1, w2, w3 = w[j0], w[j1], w[j2], w[j3]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for c in range(d):
                xc = xi[c]
                s0 += w0[c] * xc
                s1 += w1[c] * xc
                s2 += w2[c] * xc
                s3 += w3[c] * xc
            if has_bias:
                s0 += b[j0]
                s1 += b[j1]
                s2 += b[j2]
                s3 += b[j3]
            out[i, j0] = s0
            out[i, j1] = s1
            out[i, j2] = s2
            out[i, j3] = s3
            p += 4
        while p < end:
            j = cols[p]
            p += 1
            if j < 0 or j >= n:
                bad += 1
                continue
            wj = w[j]
            s = zero
            for c in range(d):
                s += wj[c] * xi[c]
            if has_bias:
                s += b[j]
            out[i, j] = s
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

    Counting sort of the pairs by column j (serial, O(nnz + n)), then one task per row of dw.
    """
    m, d = x.shape
    n = dw.shape[0]
    start = np.zeros(n + 1, np.int64)
    bad = 0
    for i in range(m):
        for p in range(offsets[i], offsets[i + 1]):
            j = cols[p]
            if j < 0 or j >= n:
                bad += 1
            else:
                start[j + 1] += 1
    for j in range(n):
        start[j + 1] += start[j]
    cursor = start[:n].copy()
    ex = np.empty(start[n], np.int64)  # example number of each pair, grouped by column
    for i in range(m):
        for p in range(offsets[i], offsets[i + 1]):
            j = cols[p]
            if 0 <= j < n:
                ex[cursor[j]] = i
                cursor[j] += 1
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


_tls = threading.local()


def _threads() -> None:
    """numba's thread count (per calling thread) follows torch's; set only when it changed."""
    t = torch.get_num_threads()
    if numba is not None and getattr(_tls, "threads", None) != t:
        numba.set_num_threads(max(1, min(t, numba.config.NUMBA_NUM_THREADS)))
        _tls.threads = t


# --------------------------------------------------------------------------------------------
# Python entry points (no dispatcher). Outputs are numpy-allocated and shared via from_numpy.


def _array(name: str, t: Tensor, ndim: int) -> np.ndarray:
    """A float32/float64 CPU tensor of rank ``ndim`` as a C-contiguous numpy array."""
    if not (t.is_cpu and t.dtype in _DTYPES and t.layout == torch.strided):
        raise TypeError(f"{name} must be a float32/float64 CPU tensor, got {t.dtype} on {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.detach().contiguous().numpy()


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


def _raise_bad(bad: int, n: int) -> None:
    if bad:
        raise IndexError(f"{bad} value(s) of cols outside [0, {n})")


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
        _threads()
        bad = _forward_impl(xn, wn, bn, bias is not None, off, cn, out, _ZERO[x.dtype])
        _raise_bad(bad, n)
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
        _threads()
        _raise_bad(_dx_impl(off, cn, gn, wn, out), wn.shape[0])
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
        _threads()
        _raise_bad(_dw_impl(off, cn, gn, xn, dw, db, _ZERO[x.dtype]), n)
    return torch.from_numpy(dw), torch.from_numpy(db)


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


@_active_linear_op.register_fake
def _(x, weight, bias, offsets, cols, base):
    return base.new_empty(base.shape)


@_active_linear_dx_op.register_fake
def _(offsets, cols, grad, weight):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@_active_linear_dw_op.register_fake
def _(offsets, cols, grad, x):
    return x.new_empty((grad.shape[1], x.shape[1])), x.new_empty((grad.shape[1],))


def warmup(dtypes=(torch.float32, torch.float64)) -> None:
    """Compile (or load from numba's cache) the three kernels for ``dtypes``."""
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
