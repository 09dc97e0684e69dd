"""Compiled CPU kernels (numba) for meProp's per-example backward: the fallback of the C++ ones.

For a linear layer ``z = x W^T + b`` with ``x`` (M, in), ``W`` (n, in) and output gradient
``g`` (M, n), meProp keeps the k largest |g| of each row and computes both products from that
index/value form only:

* ``topk_rows(g, k) -> (idx, vals)``: idx (M, k) int64 columns, vals = g.gather(1, idx), order
  within a row unspecified. NaN ranks above +-inf, which ranks above every number. O(M n):
  radix selection on the float bits read as integers (see ``_radix_top``).
* ``rows_matmul(idx, vals, W) -> dx`` (M, in): dx[i] = sum_j vals[i, j] W[idx[i, j]].
* ``rows_outer(idx, vals, x, n) -> (rows, dw_rows)``: the weight gradient g~^T x in row-compact
  form: ``rows`` (R,) int64 are the sorted distinct values of ``idx``, dw_rows (R, in) their
  rows of dW. The (i, j) pairs are counting-sorted by row first, so each output row is
  written by one task (no races).
* ``rows_outer_dense(idx, vals, x, n) -> dW`` (n, in), zero in the rows idx never names: one
  pass writing each row once (cheaper than zeros + index_copy of the compact form).

The products cost O(M k in) instead of the O(M n in) of dense GEMMs. Duplicate indices are
accumulated; out-of-range ones raise IndexError. float32 and float64, any strides (copied to
contiguous where needed), M = 0 included.

``meprop.kernels.native`` (C++) has the same four functions and runs instead where a C++
compiler is available (``meprop.ops`` picks); ``meprop.kernels.registry`` registers them as
``torch.ops.meprop.<name>`` custom ops for torch.compile.

Kernels run in parallel over rows with numba's ``prange`` (the threading layer numba picks:
OpenMP when available, a second OpenMP runtime beside torch's), with numba's thread count set
to ``torch.get_num_threads()``; small problems run a serial build instead. Compiled code is
cached on disk (``cache=True``): only the first run on a machine compiles, ~10 s per dtype
(``warmup`` compiles everything at a chosen moment).
"""

from __future__ import annotations

import os
import threading
import types

import numpy as np
import torch
from torch import Tensor

from . import checks
from .checks import check_float, check_n, check_pairs, raise_bad, supports

__all__ = [
    "available",
    "supports",
    "warmup",
    "topk_rows",
    "rows_matmul",
    "rows_outer",
    "rows_outer_dense",
]

try:  # numba is a core dependency; be defensive anyway (a broken install must not break meprop)
    import numba
    from numba import prange

    # numba's OpenMP workers spin after each parallel call and slow the PyTorch ops that
    # follow (a 0.18 ms reduction took 8 ms right after a kernel). The workqueue layer's
    # workers sleep instead. It does not allow parallel kernels launched from several threads
    # at once; set NUMBA_THREADING_LAYER to choose another layer.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    _NUMBA = True
    _MAX_THREADS = numba.config.NUMBA_NUM_THREADS
except Exception:  # pragma: no cover - ImportError, or numba refusing this numpy version
    numba = None
    prange = range
    _NUMBA = False
    _MAX_THREADS = 1

# Bit views used by topk_rows: |v| as an integer key (sign bit cleared). For IEEE floats this
# orders every number by magnitude, then +-inf, then NaN: exactly the ranking we want, with
# integer compares (cheap, and vectorisable without fastmath).
# span: the range of keys the first radix level resolves finely, 32 binary exponents.
_BITS = {
    torch.float32: (np.int32, 0x7FFF_FFFF, 32 << 23),
    torch.float64: (np.int64, 0x7FFF_FFFF_FFFF_FFFF, 32 << 52),
}


def _jit(parallel: bool, inline: bool = False):
    """njit with on-disk caching; falls back to no caching where numba finds no cache dir.

    ``inline``: inlined into its callers at numba's IR level (its prange loops then run in
    parallel inside a parallel caller, serially inside a serial one).
    """

    def wrap(fn):
        if not _NUMBA:  # pragma: no cover - pure Python, only reached if someone forces it
            return fn
        opts = dict(nogil=True, fastmath=False, parallel=parallel)
        if inline:
            opts["inline"] = "always"
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError:  # pragma: no cover - "no locator available" (read-only install)
            return numba.njit(**opts)(fn)

    return wrap


def available() -> bool:
    """Whether numba imported, so the compiled kernels can run."""
    return _NUMBA


# Parallel kernels only above ~4 us of estimated serial work: waking numba's threads costs a
# couple of microseconds. Estimates from this kind of machine (AVX2): the selection handles
# about 1 entry per ns, the products about 8 multiply-adds per ns.
_PAR_MIN_NS = 4000


# --------------------------------------------------------------------------------------------
# Kernels (numba). Shapes in comments; all arrays C-contiguous.


@_jit(parallel=False)  # (not inlined: three call sites would triple its compile time)
def _radix_top(keys, mask, span, cols, nc, need, out, hist, direct):
    """Write to out[:need] the ``need`` columns among cols[:nc] with the largest keys & mask.

    Radix selection on the integer keys: each level histograms the candidates' keys into up
    to 256 bins spanning [lo, hi], finds the bin b holding the need-th largest, moves the
    columns of the bins above b to ``out`` and keeps those of bin b as the candidates of the
    next level, whose range is bin b's. Keys more than ``span`` below the maximum share bin 0,
    so the first level resolves the top exponents finely even when there are zeros or tiny
    values. A few passes over the candidates, whatever ``need``. Among equal keys the earlier
    candidates win. ``direct``: the candidates are all of keys (cols[t] == t is not read, only
    written), else cols[:nc]. cols (>= nc) and hist (256,) are scratch.
    """
    nout = 0
    lo = keys[0 if direct else cols[0]] & mask
    hi = lo
    for t in range(1, nc):  # vectorised integer min/max when direct
        v = keys[t if direct else cols[t]] & mask
        lo = min(lo, v)
        hi = max(hi, v)
    first = direct
    while hi > lo and nc > need:
        base = max(lo, hi - span)  # keys below base go to bin 0
        top = 15  # about one bin per candidate (16..256): few empty bins to scan
        while top < nc and top < 255:
            top = 2 * top + 1
        shift = 0
        while ((hi - base) >> shift) > top:
            shift += 1
        b = (hi - base) >> shift  # the highest bin
        for t in range(b + 1):
            hist[t] = 0
        if first:
            for j in range(nc):
                hist[max((keys[j] & mask) - base, 0) >> shift] += 1
        else:
            for t in range(nc):
                hist[max((keys[cols[t]] & mask) - base, 0) >> shift] += 1
        above = 0
        while above + hist[b] < need:
            above += hist[b]
            b -= 1
        # Split the candidates: bins above b go to out, bin b stays. Branch-free stores,
        # except on a first level whose survivors are few (then branches predict well).
        nc2 = 0
        bot = base + (b << shift)  # bin b's smallest key (bin 0: and all below base)
        if first and b > 0 and above + hist[b] <= (nc >> 3):
            for j in range(nc):
                v = keys[j] & mask
                if v >= bot:
                    if ((v - base) >> shift) > b:
                        out[nout] = j
                        nout += 1
                    else:
                        cols[nc2] = j
                        nc2 += 1
        else:
            for t in range(nc):
                j = t if first else cols[t]
                kb = max((keys[j] & mask) - base, 0) >> shift
                out[nout] = j  # in bounds: fewer than need columns lie above bin b
                nout += kb > b
                cols[nc2] = j
                nc2 += kb == b
        nc = nc2
        first = False
        need -= above
        # Next level: bin b's key range. Bin 0 also holds the keys below base, down to lo.
        if b > 0:
            lo = bot
        hi = bot + min(hi - bot, (1 << shift) - 1)  # (no overflow near the NaN keys)
    # All remaining candidates are needed, or all have equal keys: the first ones do.
    for t in range(need):
        out[nout + t] = t if first else cols[t]


@_jit(parallel=False, inline=True)
def _select_row(keys, mask, span, out, cand, hist, lane):
    """The k = len(out) largest of keys & mask (n,) into out (their column numbers).

    For small k (8 k <= n) a prefilter first: the maxima of 2k strided lanes (lane j holds
    columns j, j + 2k, ...: a vectorised pass) give a threshold, their k-th largest, that at
    least k keys reach and, on most data, few more (about 1.3 k); radix selection then runs
    on those. Otherwise radix selection on the whole row. scratch: cand (n,), hist (256,),
    lane (2k,).
    """
    n = keys.shape[0]
    k = out.shape[0]
    if k == n:
        for t in range(n):
            out[t] = t
        return
    p = 2 * k
    if 4 * p > n:
        _radix_top(keys, mask, span, cand, n, k, out, hist, True)
        return
    for j in range(p):
        lane[j] = keys[j] & mask
    s = p
    while s + p <= n:
        for j in range(p):
            lane[j] = max(lane[j], keys[s + j] & mask)
        s += p
    for j in range(n - s):
        lane[j] = max(lane[j], keys[s + j] & mask)
    _radix_top(lane, mask, span, cand, p, k, out, hist, True)  # the top k lanes
    thr = lane[out[0]]
    for t in range(1, k):
        thr = min(thr, lane[out[t]])
    nc = 0
    for j in range(n):  # mostly not taken: predictable
        if (keys[j] & mask) >= thr:
            cand[nc] = j
            nc += 1
    _radix_top(keys, mask, span, cand, nc, k, out, hist, False)


def _topk_rows_impl(g, bits, mask, span, idx, vals, chunks):
    """g (M, n) floats; bits (M, n) the same memory as ints; idx, vals (M, k) outputs.

    Rows are split into ``chunks`` runs (a few per thread), each with its own scratch.
    """
    m, n = g.shape
    k = idx.shape[1]
    nch = max(1, min(m, chunks))
    for ch in prange(nch):
        cand = np.empty(n, np.int64)
        hist = np.empty(256, np.int64)
        lane = np.empty(2 * k, bits.dtype)
        for i in range(ch * m // nch, (ch + 1) * m // nch):
            _select_row(bits[i], mask, span, idx[i], cand, hist, lane)
            for t in range(k):
                vals[i, t] = g[i, idx[i, t]]


def _rows_matmul_impl(idx, vals, w, out, block):
    """out (M, in) = sum_j vals[i, j] * w[idx[i, j]]; idx, vals (M, k); w (n, in).

    Tasks are (column block, row) pairs, blocks outermost: even M = 1 keeps every thread busy,
    and each thread sweeps its own slice of W's columns, which stays in cache across rows.
    Returns the number of out-of-range indices (skipped).
    """
    m, k = idx.shape
    n, d = w.shape
    nblocks = (d + block - 1) // block
    bad = 0
    for task in prange(nblocks * m):
        b = task // m
        i = task - b * m
        c0 = b * block
        width = min(block, d - c0)
        o = out[i, c0 : c0 + width]
        for c in range(width):  # (explicit loops: a slice assignment here would be a parfor)
            o[c] = 0
        j = 0
        while j < k:
            # Four rows of W per sweep over o: half the loads and stores of o per multiply-add.
            if j + 4 <= k:
                r0, r1, r2, r3 = idx[i, j], idx[i, j + 1], idx[i, j + 2], idx[i, j + 3]
                if min(r0, r1, r2, r3) >= 0 and max(r0, r1, r2, r3) < n:
                    v0, v1, v2, v3 = vals[i, j], vals[i, j + 1], vals[i, j + 2], vals[i, j + 3]
                    w0 = w[r0, c0 : c0 + width]
                    w1 = w[r1, c0 : c0 + width]
                    w2 = w[r2, c0 : c0 + width]
                    w3 = w[r3, c0 : c0 + width]
                    for c in range(width):  # contiguous: vectorised
                        o[c] += (v0 * w0[c] + v1 * w1[c]) + (v2 * w2[c] + v3 * w3[c])
                    j += 4
                    continue
            r = idx[i, j]
            if 0 <= r < n:
                v = vals[i, j]
                wr = w[r, c0 : c0 + width]
                for c in range(width):
                    o[c] += v * wr[c]
            else:
                bad += 1
            j += 1
    return bad


@_jit(parallel=False)
def _group_by_row(idx, vals, n):
    """Counting sort of the (i, j) pairs of idx (M, k) by row idx[i, j] in [0, n): O(M k + n).

    Returns start (n + 1,) offsets into ex (M k,) example numbers and vs (M k,) values, so the
    pairs of row r are ex[start[r]:start[r + 1]] (in example order); rows (R,), the rows with
    pairs, sorted; and the number of out-of-range indices (left out).
    """
    m, k = idx.shape
    start = np.zeros(n + 1, np.int64)
    bad = 0
    for i in range(m):
        for j in range(k):
            r = idx[i, j]
            if r < 0 or r >= n:
                bad += 1
            else:
                start[r + 1] += 1
    nrows = 0
    for r in range(n):
        nrows += start[r + 1] > 0
        start[r + 1] += start[r]
    rows = np.empty(nrows, np.int64)
    q = 0
    for r in range(n):
        if start[r + 1] > start[r]:
            rows[q] = r
            q += 1
    cursor = start[:n].copy()
    ex = np.empty(m * k, np.int64)
    vs = np.empty(m * k, vals.dtype)
    for i in range(m):
        for j in range(k):
            r = idx[i, j]
            if 0 <= r < n:
                p = cursor[r]
                ex[p] = i
                vs[p] = vals[i, j]
                cursor[r] = p + 1
    return start, ex, vs, rows, bad


@_jit(parallel=False, inline=True)
def _outer_rows(out, rows, start, ex, vs, x, block):
    """out[q] (in,) = sum of vs[p] * x[ex[p]] over the pairs of row rows[q], for every q.

    Tasks are (column block, output row) pairs; each writes its own piece of out: no races.
    """
    nrows, d = out.shape
    nblocks = (d + block - 1) // block
    for task in prange(nblocks * nrows):
        b = task // nrows
        q = task - b * nrows
        c0 = b * block
        width = min(block, d - c0)
        o = out[q, c0 : c0 + width]
        for c in range(width):
            o[c] = 0
        r = rows[q]
        p = start[r]
        while p + 4 <= start[r + 1]:  # four pairs per sweep over o, as in _rows_matmul_impl
            v0, v1, v2, v3 = vs[p], vs[p + 1], vs[p + 2], vs[p + 3]
            x0 = x[ex[p], c0 : c0 + width]
            x1 = x[ex[p + 1], c0 : c0 + width]
            x2 = x[ex[p + 2], c0 : c0 + width]
            x3 = x[ex[p + 3], c0 : c0 + width]
            for c in range(width):
                o[c] += (v0 * x0[c] + v1 * x1[c]) + (v2 * x2[c] + v3 * x3[c])
            p += 4
        while p < start[r + 1]:
            v = vs[p]
            xr = x[ex[p], c0 : c0 + width]
            for c in range(width):
                o[c] += v * xr[c]
            p += 1


def _rows_outer_impl(idx, vals, x, n, block):
    """(rows (R,), dw_rows (R, in), bad): the touched rows of g~^T x; x (M, in)."""
    start, ex, vs, rows, bad = _group_by_row(idx, vals, n)
    out = np.empty((rows.shape[0], x.shape[1]), x.dtype)
    _outer_rows(out, rows, start, ex, vs, x, block)
    return rows, out, bad


def _outer_rows_impl(out, rows, start, ex, vs, x, block):
    """_outer_rows into a given out (R, in): for outputs allocated by the caller."""
    _outer_rows(out, rows, start, ex, vs, x, block)


def _rows_outer_dense_impl(idx, vals, x, out, block):
    """out (n, in) = g~^T x, zero rows where untouched; x (M, in)."""
    start, ex, vs, _, bad = _group_by_row(idx, vals, out.shape[0])
    _outer_rows(out, np.arange(out.shape[0]), start, ex, vs, x, block)
    return bad


def _renamed(fn, suffix: str):
    """A copy of ``fn`` under another qualname: numba's cache tells functions apart by
    qualname and signature only, so the serial and parallel builds need different names."""
    f = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix)
    f.__qualname__ = fn.__qualname__ + suffix
    return f


# Each kernel twice: parallel, and serial for small problems (each compiled on first use, per
# dtype: a cold compile takes seconds, a cached one milliseconds).
_K = {
    name: (_jit(parallel=True)(fn), _jit(parallel=False)(_renamed(fn, "_serial")))
    for name, fn in [
        ("topk", _topk_rows_impl),
        ("matmul", _rows_matmul_impl),
        ("outer", _rows_outer_impl),
        ("outer_rows", _outer_rows_impl),
        ("outer_dense", _rows_outer_dense_impl),
    ]
}


_tls = threading.local()


def _kernel(name: str, ns: int):
    """The parallel kernel, or the serial one for work too small (``ns``) to share out.

    Also sets numba's thread count (per calling thread in numba) to torch's, only when torch's
    changed since this thread last looked: numba.get/set_num_threads cost microseconds.
    """
    t = torch.get_num_threads()
    if _NUMBA and getattr(_tls, "threads", None) != t:
        numba.set_num_threads(max(1, min(t, _MAX_THREADS)))
        _tls.threads = t
    par, ser = _K[name]
    return par if t > 1 and ns >= _PAR_MIN_NS else ser


def _block(m: int, d: int) -> int:
    """Column block of the products for m output rows of width d: whole rows when there are
    enough rows to share out, else narrower blocks (>= 256 columns) so all threads get work."""
    tasks = 4 * torch.get_num_threads()
    if m >= tasks or d <= 256:
        return max(d, 1)
    per = -(-d * m // tasks)  # columns per task, rounded up
    return max(256, -(-per // 16) * 16)


# --------------------------------------------------------------------------------------------
# Python entry points (no dispatcher: several microseconds cheaper than torch.ops.meprop.*).
# Light checks only: devices, dtypes, ranks; index bounds are counted by the kernels. Outputs
# are numpy-allocated (cheaper than torch.empty here) and shared with torch via from_numpy.


def _numpy(t: Tensor) -> np.ndarray:
    """A checked contiguous CPU tensor as a numpy array (no copy)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _pairs(idx: Tensor, vals: Tensor, other: Tensor, other_name: str, rows: int):
    """``checks.check_pairs``, as numpy arrays."""
    i, v, o = check_pairs(idx, vals, other, other_name, rows)
    return i.numpy(), _numpy(v), _numpy(o)


def topk_rows(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest-magnitude entries of each row of ``g`` (M, n), 1 <= k <= n.

    Returns ``idx`` (M, k) int64 column numbers and ``vals = g.gather(1, idx)``; the order
    within a row is unspecified. NaN ranks above +-inf, which ranks above every number; among
    equal magnitudes the lower columns win.
    """
    gn = _numpy(check_float("g", g))
    if gn.ndim != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    m, n = gn.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")
    idx = np.empty((m, k), np.int64)
    vals = np.empty((m, k), gn.dtype)
    if m:
        int_dtype, mask, span = _BITS[g.dtype]
        kern = _kernel("topk", m * n)  # ~1 ns per entry
        kern(gn, gn.view(int_dtype), mask, span, idx, vals, 4 * torch.get_num_threads())
    return torch.from_numpy(idx), torch.from_numpy(vals)


def rows_matmul(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``dx`` (M, in): dx[i] = sum_j vals[i, j] * weight[idx[i, j]] for idx, vals (M, k) and
    weight (n, in); i.e. g~ @ weight for the sparse g~ (M, n) that (idx, vals) describe."""
    i, v, w = _pairs(idx, vals, weight, "weight", -1)
    m = i.shape[0]
    d = w.shape[1]
    out = np.empty((m, d), w.dtype)
    if m and d:
        bad = _kernel("matmul", i.size * d // 8)(i, v, w, out, _block(m, d))
        raise_bad(bad, w.shape[0])
    return torch.from_numpy(out)


def rows_outer(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """g~^T @ x in row-compact form, for the sparse g~ (M, n) that idx, vals (M, k) describe
    and x (M, in).

    Returns ``rows`` (R,) int64, the sorted distinct values of idx, and ``dw_rows`` (R, in):
    dw_rows[r] = sum of vals[i, j] * x[i] over the (i, j) with idx[i, j] == rows[r].
    """
    i, v, xn = _pairs(idx, vals, x, "x", idx.shape[0])
    check_n(n)
    d = xn.shape[1]
    r_max = min(n, i.size)  # R <= r_max
    ns = i.size * d // 8
    if r_max * d * xn.itemsize < checks.BIG_BYTES:  # one call; the kernel allocates dw_rows
        rows, out, bad = _kernel("outer", ns)(i, v, xn, n, _block(r_max, d))
        raise_bad(bad, n)
    else:  # group the pairs, then fill a numpy-allocated dw_rows (R, in)
        start, ex, vs, rows, bad = _group_by_row(i, v, n)
        raise_bad(bad, n)
        out = np.empty((rows.shape[0], d), xn.dtype)
        block = _block(rows.shape[0], d)
        _kernel("outer_rows", ns)(out, rows, start, ex, vs, xn, block)
    return torch.from_numpy(rows), torch.from_numpy(out)


def rows_outer_dense(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
    """g~^T @ x as a dense (n, in) tensor, zero in the rows idx never names; see rows_outer."""
    i, v, xn = _pairs(idx, vals, x, "x", idx.shape[0])
    check_n(n)
    d = xn.shape[1]
    out = np.empty((n, d), xn.dtype)
    if n and d:
        bad = _kernel("outer_dense", (i.size + n) * d // 8)(i, v, xn, out, _block(n, d))
        raise_bad(bad, n)
    return torch.from_numpy(out)


def warmup(dtypes=(torch.float32, torch.float64)) -> None:
    """Compile (or load from numba's cache) every kernel, serial and parallel, for ``dtypes``.

    Optional (kernels compile on first use), but moves that cost to a known moment.
    """
    if not _NUMBA:
        return
    for dtype in dtypes:
        int_dtype, mask, span = _BITS[dtype]
        g = torch.randn(3, 5, dtype=dtype).numpy()
        idx = np.zeros((3, 2), np.int64)
        vals = np.zeros((3, 2), g.dtype)
        x = np.zeros((3, 4), g.dtype)
        args = {
            "topk": (g, g.view(int_dtype), mask, span, idx, vals, 2),
            "matmul": (idx, vals, x, np.empty_like(x), 4),
            "outer": (idx, vals, x, 5, 4),
            "outer_rows": (
                x.copy(),
                np.arange(3),
                np.arange(4),
                idx[:, 0].copy(),
                x[:, 0].copy(),
                x,
                4,
            ),
            "outer_dense": (idx, vals, x, np.empty((5, 4), g.dtype), 4),
        }
        for name, kernels in _K.items():
            for kern in kernels:
                kern(*args[name])
