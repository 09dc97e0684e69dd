"""meProp's sparse backward on GPUs: Triton kernels (per_example) and compacted GEMMs (unified).

``backward`` has the signature and semantics of the implementations in ``meprop.ops``
(``_impl_native``, ``_impl_torch``, ...): for g (M, n), x (M, in), weight (n, in) and k < n it
returns ``(sel, dx, dW, db)``.

* ``per_example``: the top-k of each row of g by ``torch.topk`` (NaN ranks highest), then two
  Triton kernels on the selected (idx, vals) (M, k):

  - dx = g~ W, a gather-GEMM: dx[i] = sum_j vals[i, j] * W[idx[i, j]];
  - dW = g~^T x: the M k pairs are grouped by output row (a stable sort of idx), and one
    program sums its row's pairs: dW[r] = sum vals[i, j] * x[i] over idx[i, j] == r. No
    atomics, so the result is deterministic (the same bits run to run). Dense dW is written
    in one pass (untouched rows zero); ``sparse_grad`` gives the touched rows only.

  Both are one segmented kernel (``_segment_matmul``): out[r] = sum over the pairs p of
  segment r of val[p] * src[col[p]].
* ``unified``: the column scores sum_i |g[i, c]| in float32 by a Triton kernel (one pass over
  g, no |g| temporary), the top-k columns by ``torch.topk``, then dense GEMMs on the compacted
  gradient g[:, cols] (cuBLAS on a GPU): dx = g[:, cols] W[cols], dW[cols] = g[:, cols]^T x.

float32, float16 and bfloat16 (and float64) tensors; the kernels accumulate in float32 (float64
for float64) and store in the tensors' dtype.

The four row operations are also ``torch.ops.meprop_triton.{topk_rows, rows_matmul,
rows_outer, rows_outer_dense}``, custom ops with fake implementations (so torch.compile
traces them) with the semantics of ``meprop.kernels.cpu``'s functions of those names, plus
``column_scores``. This module exposes the same four functions, so it can stand where
``meprop.ops`` and ``meprop.lstm`` take a kernel module.

CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment,
read at each launch): that is how the tests check the kernels on machines without a GPU.
Without the variable, CPU tensors raise a RuntimeError. Importing this module without Triton
installed works; ``available()`` is then False and the functions raise.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import fakes

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the optional "gpu" extra
    triton = tl = None

__all__ = [
    "available",
    "interpreting",
    "supports",
    "require",
    "backward",
    "topk_rows",
    "rows_matmul",
    "rows_outer",
    "rows_outer_dense",
    "column_scores",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def available() -> bool:
    """Whether Triton is installed."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def supports(t: Tensor) -> bool:
    """Whether the kernels can run on tensors like ``t`` now: a float (32, 16, bf16 or 64)
    strided tensor, on a CUDA device, or on the CPU under Triton's interpreter."""
    if triton is None or t.dtype not in _DTYPES or t.layout != torch.strided:
        return False
    return t.is_cuda or (t.is_cpu and interpreting())


def require(t: Tensor, name: str = "tensors") -> None:
    """Raise a RuntimeError saying why the kernels cannot run on ``t`` (``name`` in the
    message), if they cannot: see ``supports``."""
    if triton is None:
        raise RuntimeError(
            "backend='triton' needs Triton: pip install 'meprop[gpu]' (or pip install triton)"
        )
    if t.layout != torch.strided or t.dtype not in _DTYPES:
        raise RuntimeError(
            f"backend='triton' needs dense float32/float16/bfloat16/float64 tensors, got "
            f"{name} {t.dtype} ({t.layout})"
        )
    if t.is_cpu and not interpreting():
        raise RuntimeError(
            "backend='triton' runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment (for tests; slow), move the tensors to a CUDA "
            "device, or use backend='auto'"
        )
    if not (t.is_cpu or t.is_cuda):
        raise RuntimeError(f"backend='triton' needs CUDA (or CPU) tensors, got {t.device}")


# --------------------------------------------------------------------------------------------
# Kernels. The bodies are plain functions, compiled by ``_kernel`` on first launch: triton.jit
# decides between the compiler and the interpreter when it wraps a function, so wrapping at
# launch time (cached per mode) follows TRITON_INTERPRET whenever this module was imported.
# They call Triton builtins only, no @triton.jit library functions (tl.sum, tl.zeros): those
# were wrapped when triton was imported, and the interpreter cannot call compiled ones, so
# sums are tl.reduce with the library's sum (which the interpreter runs as numpy's sum).


def _segment_matmul_body(
    ptr,  # (R + 1,) int64: segment r is pairs [ptr[r], ptr[r + 1])
    col,  # (P,) int64: the row of src that pair p reads
    val,  # (P,): the pair's coefficient
    src,  # (*, D) rows of stride stride_src, unit column stride
    out,  # (R, D) rows of stride stride_out, unit column stride
    D,
    stride_src,
    stride_out,
    ACC: tl.constexpr,  # accumulator dtype
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[r, d] = sum over p in segment r of val[p] * src[col[p], d]; zero for empty r."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = tl.load(ptr + r)
    end = tl.load(ptr + r + 1)
    acc = tl.full((BLOCK_D,), 0.0, ACC)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < end
        c = tl.load(col + offs_p, mask=p_ok, other=0)
        v = tl.load(val + offs_p, mask=p_ok, other=0.0).to(ACC)
        s = tl.load(
            src + c[:, None] * stride_src + offs_d[None, :],
            mask=p_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.reduce(v[:, None] * s, 0, tl.standard._sum_combine)
    tl.store(out + r * stride_out + offs_d, acc.to(out.dtype.element_ty), mask=d_ok)


def _column_scores_body(
    g,  # (M, N) rows of stride stride_g, unit column stride
    out,  # (N,) float32 (float64 for float64 g)
    M,
    N,
    stride_g,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[c] = sum_i |g[i, c]|, accumulated in ACC (NaN anywhere in a column gives NaN)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.full((BLOCK_N,), 0.0, ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        tile = tl.load(
            g + offs_m[:, None] * stride_g + offs_n[None, :],
            mask=(offs_m[:, None] < M) & n_ok[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.reduce(tl.abs(tile), 0, tl.standard._sum_combine)
    tl.store(out + offs_n, acc, mask=n_ok)


_BODIES = {"segment_matmul": _segment_matmul_body, "column_scores": _column_scores_body}
_JITTED: dict = {}


def _kernel(name: str):
    key = (name, interpreting())
    fn = _JITTED.get(key)
    if fn is None:
        fn = _JITTED[key] = triton.jit(_BODIES[name])
    return fn


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _segment_matmul(ptr: Tensor, col: Tensor, val: Tensor, src: Tensor, rows: int) -> Tensor:
    """(rows, D): out[r] = sum over the pairs of segment r of val[p] * src[col[p]]."""
    d = src.shape[1]
    out = torch.empty((rows, d), dtype=src.dtype, device=src.device)
    if rows == 0 or d == 0:
        return out
    if src.stride(1) != 1:
        src = src.contiguous()
    # Interpreter: one program per row (numpy ops on whole rows); GPU: 128-column tiles.
    block_d = min(_pow2(d), 1024 if src.is_cpu else 128)
    block_p = 16 if src.is_cpu else 8
    grid = (rows, triton.cdiv(d, block_d))
    _kernel("segment_matmul")[grid](
        ptr,
        col,
        val,
        src,
        out,
        d,
        src.stride(0),
        out.stride(0),
        ACC=_acc_dtype(src.dtype),
        BLOCK_P=block_p,
        BLOCK_D=block_d,
    )
    return out


def _check_pairs(idx: Tensor, vals: Tensor, other: Tensor, name: str, rows: int) -> None:
    require(vals, "vals")
    require(other, name)
    if idx.dim() != 2 or idx.shape != vals.shape:
        raise ValueError(
            f"idx and vals must be (M, k) of one shape, got {tuple(idx.shape)} and "
            f"{tuple(vals.shape)}"
        )
    if idx.dtype != torch.int64:
        raise ValueError(f"idx must be int64, got {idx.dtype}")
    if other.dim() != 2 or (rows >= 0 and other.shape[0] != rows):
        raise ValueError(f"{name} must be ({rows if rows >= 0 else 'n'}, in), got {other.shape}")
    if vals.dtype != other.dtype:
        raise ValueError(f"vals and {name} must have one dtype, got {vals.dtype}, {other.dtype}")
    if not (idx.device == vals.device == other.device):
        raise ValueError("idx, vals and the dense operand must be on one device")


# --------------------------------------------------------------------------------------------
# The row operations (meprop.kernels.cpu's semantics)


def topk_rows(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest-magnitude entries of each row of ``g`` (M, n), 1 <= k <= n: ``idx`` (M, k)
    int64 and ``vals = g.gather(1, idx)``; order within a row unspecified, NaN ranks highest."""
    require(g, "g")
    if g.dim() != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    if not 1 <= k <= g.shape[1]:
        raise ValueError(f"k must be in [1, n] = [1, {g.shape[1]}], got k={k}")
    idx = g.abs().topk(k, dim=1, sorted=False).indices
    return idx, g.gather(1, idx)


def rows_matmul(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``dx`` (M, in): dx[i] = sum_j vals[i, j] * weight[idx[i, j]] (g~ @ weight)."""
    _check_pairs(idx, vals, weight, "weight", -1)
    m, k = idx.shape
    ptr = torch.arange(m + 1, device=idx.device) * k
    return _segment_matmul(ptr, idx.contiguous().view(-1), vals.contiguous().view(-1), weight, m)


def _group(idx: Tensor, vals: Tensor, n: int, check: bool):
    """The (i, j) pairs sorted by row idx[i, j] (stable): the sorted rows, each pair's example
    i and value. ``check``: raise IndexError for rows outside [0, n) (one host sync)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    srt, perm = torch.sort(flat, stable=True)
    if check and srt.numel() and bool((srt[0] < 0) | (srt[-1] >= n)):
        bad = int(((flat < 0) | (flat >= n)).sum())
        raise IndexError(f"{bad} value(s) of idx outside [0, {n})")
    ex = torch.div(perm, max(k, 1), rounding_mode="floor")
    vs = vals.contiguous().reshape(-1).index_select(0, perm)
    return srt, ex, vs


def _rows_outer(idx, vals, x, n, check=True):
    srt, ex, vs = _group(idx, vals, n, check)
    rows, counts = torch.unique_consecutive(srt, return_counts=True)
    ptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return rows, _segment_matmul(ptr, ex, vs, x, rows.shape[0])


def _rows_outer_dense(idx, vals, x, n, check=True):
    srt, ex, vs = _group(idx, vals, n, check)
    ptr = torch.searchsorted(srt, torch.arange(n + 1, device=idx.device))
    return _segment_matmul(ptr, ex, vs, x, n)


def rows_outer(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """g~^T @ x in row-compact form: ``rows`` (R,) int64, the sorted distinct values of idx,
    and ``dw_rows`` (R, in): dw_rows[r] = sum of vals[i, j] * x[i] over idx[i, j] == rows[r]."""
    _check_pairs(idx, vals, x, "x", idx.shape[0])
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _rows_outer(idx, vals, x, n)


def rows_outer_dense(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
    """g~^T @ x as a dense (n, in) tensor, zero in the rows idx never names; see rows_outer."""
    _check_pairs(idx, vals, x, "x", idx.shape[0])
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _rows_outer_dense(idx, vals, x, n)


def column_scores(g: Tensor) -> Tensor:
    """(n,) sum over the rows of |g| (M, n), in float32 (float64 for float64 g)."""
    require(g, "g")
    if g.dim() != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    m, n = g.shape
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = torch.zeros(n, dtype=acc, device=g.device)
    if m == 0 or n == 0:
        return out
    if g.stride(1) != 1:
        g = g.contiguous()
    # GPU: narrow column blocks where n is small, so that there are programs for every SM
    block_n = min(_pow2(n), 1024) if g.is_cpu else max(32, min(128, _pow2(n // 256)))
    block_m = min(_pow2(m), 256 if g.is_cpu else 32)
    _kernel("column_scores")[(triton.cdiv(n, block_n),)](
        g,
        out,
        m,
        n,
        g.stride(0),
        ACC=_acc_dtype(g.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out


def select_columns(g: Tensor, k: int) -> Tensor:
    """Unified selection: the k columns of g (M, n) with the largest sum of |g|; (k,) sorted."""
    return column_scores(g).topk(k, sorted=False).indices.sort().values


# --------------------------------------------------------------------------------------------
# The implementation of one layer's sparse backward (meprop.ops.IMPLEMENTATIONS["triton"])


def backward(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
    """meProp's backward of ``z = x W^T + b`` for g (M, n) contiguous, x (M, in), weight
    (n, in) and 1 <= k < n (``k >= n`` is the dense gradient, handled before the call).

    Returns (sel, dx, dW, db) as ``meprop.ops``'s implementations do: sel is ("rows", idx,
    vals) with idx, vals (M, k), or ("cols", cols (k,) sorted, g[:, cols] (M, k)); dx (M, in)
    or None; dW dense (n, in), row-sparse COO (``sparse_grad``) or None; db = g.sum(0) when
    ``full_db``, else None.
    """
    from ..grads import weight_grad

    for t, name in ((g, "g"), (x, "x"), (weight, "weight")):
        require(t, name)
    n = weight.shape[0]
    if mode == "unified":
        cols = select_columns(g, k)
        gc = g.index_select(1, cols)  # (M, k)
        sel = ("cols", cols, gc)
        dx = gc @ weight.index_select(0, cols) if need_dx else None
        dw = weight_grad(cols, gc.t() @ x, n, sparse_grad) if need_dw else None
    elif mode == "per_example":
        idx, vals = topk_rows(g, k)
        sel = ("rows", idx, vals)
        dx = rows_matmul(idx, vals, weight) if need_dx else None
        dw = None  # (idx comes from topk: no range check, which would sync with the GPU)
        if need_dw and sparse_grad:
            dw = weight_grad(*_rows_outer(idx, vals, x, n, check=False), n, True)
        elif need_dw:
            dw = _rows_outer_dense(idx, vals, x, n, check=False)
    else:
        raise ValueError(f"backend='triton' runs per_example and unified, got mode={mode!r}")
    return sel, dx, dw, g.sum(0) if full_db else None


# --------------------------------------------------------------------------------------------
# Custom ops: torch.ops.meprop_triton.* (fake implementations for torch.compile)

if triton is not None:

    @torch.library.custom_op("meprop_triton::topk_rows", mutates_args=())
    def _topk_rows_op(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return topk_rows(g, k)

    @torch.library.custom_op("meprop_triton::rows_matmul", mutates_args=())
    def _rows_matmul_op(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
        return rows_matmul(idx, vals, weight)

    @torch.library.custom_op("meprop_triton::rows_outer", mutates_args=())
    def _rows_outer_op(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        return rows_outer(idx, vals, x, n)

    @torch.library.custom_op("meprop_triton::rows_outer_dense", mutates_args=())
    def _rows_outer_dense_op(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
        return rows_outer_dense(idx, vals, x, n)

    @torch.library.custom_op("meprop_triton::column_scores", mutates_args=())
    def _column_scores_op(g: Tensor) -> Tensor:
        return column_scores(g)

    for _op, _fake in (
        (_topk_rows_op, fakes.topk_rows),
        (_rows_matmul_op, fakes.rows_matmul),
        (_rows_outer_op, fakes.rows_outer),
        (_rows_outer_dense_op, fakes.rows_outer_dense),
    ):
        _op.register_fake(_fake)

    @_column_scores_op.register_fake
    def _(g: Tensor) -> Tensor:
        torch._check(g.dim() == 2, lambda: f"g must be (M, n), got shape {tuple(g.shape)}")
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        return g.new_empty((g.shape[1],), dtype=acc)
