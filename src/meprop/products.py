"""The products of one layer's sparse backward (dx, dW, the bias gradient, meSimp's usage
record) from a ``Selection``, and the implementations that compute them: compiled kernels
(C++, numba, Triton) or PyTorch ops, chosen per call signature (``pick_implementation``,
``meprop.kernels.dispatch``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .grads import weight_grad
from .kernels import dispatch
from .selection import Selection, select_columns, select_rows

__all__ = [
    "kernels_available", "kernel_module", "compact_products", "bias_grad", "record_usage",
    "rows_products", "IMPLEMENTATIONS", "candidates", "pick_implementation",
]  # fmt: skip


_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernels_available(t: Tensor) -> bool:
    """Whether compiled CPU kernels (C++ or numba) can run on tensors like ``t``."""
    try:
        return kernel_module("auto", t) is not None
    except ImportError:  # pragma: no cover - numba is a core dependency
        return False


def kernel_module(backend: str, t: Tensor):
    """The implementation of the sparse products for tensors like ``t``, or None (PyTorch ops).

    ``meprop.kernels.native`` (C++) first, then ``meprop.kernels.cpu`` (numba), as ``backend``
    allows; both expose topk_rows, rows_matmul, rows_outer and rows_outer_dense. While
    torch.compile traces: ``torch.ops.meprop`` (the same operations as custom ops with fake
    implementations; plain calls skip the dispatcher, which costs microseconds per call).
    """
    if backend in ("torch", "masked"):
        return None
    if backend == "triton" or (backend == "auto" and t.is_cuda):
        from .kernels import triton_ops

        if torch.compiler.is_compiling():  # (checks of t's layout would break the graph)
            return torch.ops.meprop_triton if triton_ops.available() else None
        if backend == "auto" and not triton_ops.supports(t):
            return None
        triton_ops.require(t)  # raises where it cannot run
        return triton_ops
    compiling = torch.compiler.is_compiling()
    # (t.layout cannot be read while torch.compile traces a backward; traced tensors are strided)
    if not (t.is_cpu and t.dtype in _KERNEL_DTYPES and (compiling or t.layout == torch.strided)):
        if backend == "auto":
            return None
        raise RuntimeError(
            f"backend={backend!r} needs float32/float64 CPU tensors, got {t.dtype} on "
            f"{t.device}; use backend='auto' to fall back to PyTorch ops"
        )
    if compiling:
        from .kernels import registry  # noqa: F401  (registers torch.ops.meprop.*)

        return torch.ops.meprop
    kern = _KERNEL_CACHE.get(backend)
    if kern is None:
        kern = _KERNEL_CACHE[backend] = _pick_kernels(backend)
    return kern or None


_KERNEL_CACHE: dict = {}  # backend -> module, or False for PyTorch ops (once per process)


def _pick_kernels(backend: str):
    if backend in ("auto", "native"):
        from .kernels import native

        if native.available():
            return native
        if backend == "native":
            raise RuntimeError(
                f"backend='native': the C++ kernels are unavailable: "
                f"{native.build_error()}; use backend='auto'"
            )
    from .kernels import cpu

    if cpu.available():
        return cpu
    if backend == "numba":
        raise RuntimeError("backend='numba' needs numba; use backend='auto'")
    return False


def compact_products(
    gc: Tensor, rows: Tensor, weight: Tensor, x: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Products from a column-compacted gradient: ``gc`` (M, R) holds the columns ``rows`` (R,).

    dx = gc @ W[rows] (M, in) and dW[rows] = gc^T @ x (R, in): dense GEMMs of size R, not n.
    """
    dx = gc @ weight.index_select(0, rows) if need_dx else None
    dw_rows = gc.t() @ x if need_dw else None
    return dx, dw_rows


def bias_grad(g: Tensor, sel: Selection, sparse: bool) -> Tensor:
    """db (n,): from the full gradient (default) or the sparsified one."""
    if not sparse or sel.kind == "all":
        return g.sum(0)
    db = g.new_zeros(g.shape[1])
    if sel.kind == "cols":
        return db.index_copy_(0, sel.index, sel.values.sum(0))
    return db.index_add_(0, sel.index.flatten(), sel.values.flatten())


def record_usage(
    counts: Tensor | None, selections: Tensor | None, sel: Selection, g: Tensor
) -> None:
    """Add this call's selections to a usage record (meSimp): no host sync, no Python loop.

    An entry counts when it is kept *and non-zero*: a zero gradient (a unit behind an inactive
    ReLU, or dropped out) moves nothing, and which zeros fill a top-k set is an accident of
    ties. So a unit seldom active for any example is pruned even once its layer is no wider
    than k (where every entry is kept)."""
    if counts is None:
        return
    if sel.kind == "all":  # g: (M, n), every entry kept
        counts.add_((g != 0).sum(0).to(counts.dtype))
    elif sel.kind == "cols":  # the same k columns serve each of the M rows; values (M, k)
        counts.index_add_(0, sel.index, (sel.values != 0).sum(0).to(counts.dtype))
    else:  # index, values: (M, k)
        counts.index_add_(0, sel.index.flatten(), (sel.values != 0).flatten().to(counts.dtype))
    if selections is not None:
        selections.add_(g.shape[0])


def rows_products(idx, vals, g, x, weight, kern, need_dx, need_dw, sparse_grad):
    """dx (M, in) and dW from a per-row selection ``idx``, ``vals`` (M, k): the kernels' row
    products where ``kern`` is a kernel module, else GEMMs on g~ compacted to the union of the
    selected columns (R <= min(n, M*k))."""
    n = weight.shape[0]
    dx = dw = None
    if kern is not None:
        if need_dx:
            dx = kern.rows_matmul(idx, vals, weight)
        if need_dw and sparse_grad:
            dw = weight_grad(*kern.rows_outer(idx, vals, x, n), n, True)
        elif need_dw:  # dense dW written in one pass, untouched rows zero
            dw = kern.rows_outer_dense(idx, vals, x, n)
        return dx, dw
    rows = idx.flatten().unique()  # sorted
    # g~ (M, n); added, not written: a column picked twice in a row (symmetric's zero picks)
    # carries its value once and 0 once
    gm = torch.zeros_like(g).scatter_add_(1, idx, vals)
    dx, dw_rows = compact_products(gm.index_select(1, rows), rows, weight, x, need_dx, need_dw)
    if need_dw:
        dw = weight_grad(rows, dw_rows, n, sparse_grad)
    return dx, dw


# --------------------------------------------------------------------------------------------
# The implementations of one layer's sparse backward (see meprop.kernels.dispatch)
#
# Each takes g (M, n) contiguous, x (M, in), weight (n, in), k < n, the mode ("per_example" or
# "unified", local selection), what is needed, and returns (sel, dx, dW, db): sel is
# ("rows", idx, vals) with idx, vals (M, k), or ("cols", cols (k,), g[:, cols] (M, k)); dx
# (M, in) or None; dW dense (n, in), row-sparse COO (sparse_grad) or None; db = g.sum(0)
# when full_db, else None.


def _impl_native(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
    """The fused C++ kernels: selection, dx, dW and the bias sum in one call."""
    from .kernels import native

    fused = native.per_example_backward if mode == "per_example" else native.unified_backward
    dw_kind = ("sparse" if sparse_grad else "dense") if need_dw else None
    a, b, dx, dw, db = fused(g, x.contiguous(), weight.contiguous(), k, need_dx, dw_kind, full_db)
    if dw_kind == "sparse":
        dw = weight_grad(*dw, weight.shape[0], True)
    return Selection("rows" if mode == "per_example" else "cols", a, b), dx, dw, db


def _impl_numba(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
    """numba's selection and row products (per_example; unified runs as ``torch``)."""
    if mode != "per_example":
        return _impl_torch(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db)
    from .kernels import cpu

    n = weight.shape[0]
    idx, vals = cpu.topk_rows(g, k)  # (M, k) each
    dx = cpu.rows_matmul(idx, vals, weight) if need_dx else None
    dw = None
    if need_dw and sparse_grad:
        dw = weight_grad(*cpu.rows_outer(idx, vals, x, n), n, True)
    elif need_dw:  # dense dW written in one pass, untouched rows zero
        dw = cpu.rows_outer_dense(idx, vals, x, n)
    return Selection("rows", idx, vals), dx, dw, g.sum(0) if full_db else None


def _impl_torch(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
    """PyTorch ops: dense GEMMs on the gradient compacted to the selected columns."""
    n = weight.shape[0]
    if mode == "unified":
        cols = select_columns(g, k)
        gc = g.index_select(1, cols)  # (M, k)
        sel, rows, gr = Selection("cols", cols, gc), cols, gc
    else:
        idx, vals = select_rows(g, k, mode)  # (M, k) each
        sel = Selection("rows", idx, vals)
        # Compact to the union of the selected columns (R <= min(n, M*k)).
        rows = idx.flatten().unique()  # sorted
        gr = torch.zeros_like(g).scatter_(1, idx, vals).index_select(1, rows)  # (M, R)
    dx, dw_rows = compact_products(gr, rows, weight, x, need_dx, need_dw)
    dw = weight_grad(rows, dw_rows, n, sparse_grad) if need_dw else None
    return sel, dx, dw, g.sum(0) if full_db else None


def _impl_masked(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
    """Mask g to the selection, then the dense GEMMs (the fallback where sparsity cannot pay)."""
    if mode == "unified":
        cols = select_columns(g, k)
        gc = g.index_select(1, cols)  # (M, k)
        sel, gm = Selection("cols", cols, gc), torch.zeros_like(g).index_copy_(1, cols, gc)
    else:
        idx, vals = select_rows(g, k, mode)
        sel, gm = Selection("rows", idx, vals), torch.zeros_like(g).scatter_(1, idx, vals)
    dx = gm @ weight if need_dx else None
    dw = None
    if need_dw:
        dw = gm.t() @ x
        if sparse_grad:
            rows = sel.index if mode == "unified" else sel.index.flatten().unique()
            dw = weight_grad(rows, dw.index_select(0, rows), weight.shape[0], True)
    return sel, dx, dw, g.sum(0) if full_db else None


def _impl_triton(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
    """Triton kernels (CUDA; CPU under TRITON_INTERPRET=1): see meprop.kernels.triton_ops."""
    from .kernels import triton_ops

    sel, dx, dw, db = triton_ops.backward(
        g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db
    )
    return Selection(*sel), dx, dw, db


IMPLEMENTATIONS = {
    "native": _impl_native,
    "numba": _impl_numba,
    "torch": _impl_torch,
    "masked": _impl_masked,
    "triton": _impl_triton,
}


def candidates(g: Tensor, mode: str) -> list[str]:
    """The implementations that can run a (local) backward of ``mode`` on tensors like ``g``,
    in the untimed default order (first: what ``MEPROP_AUTOTUNE=0`` runs)."""
    out = []
    if g.is_cpu and g.dtype in _KERNEL_DTYPES and g.layout == torch.strided:
        from .kernels import cpu, native

        if native.available():
            out.append("native")
        if mode == "per_example" and cpu.available():
            out.append("numba")
    elif g.is_cuda:
        from .kernels import triton_ops

        if triton_ops.supports(g):
            out.append("triton")
    return [*out, "torch", "masked"]


def pick_implementation(backend: str, args: tuple) -> str:
    """The implementation that runs the backward of ``args`` (the implementations' arguments):
    ``backend`` when forced, else chosen by meprop.kernels.dispatch (remembered per call
    signature, so that a step pays a dictionary look-up, not the choosing)."""
    g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db = args
    if backend != "auto":
        if backend in ("native", "numba"):
            kernel_module(backend, g)  # raises where it cannot run
        return backend
    # (MEPROP_BACKEND and MEPROP_AUTOTUNE are read when a signature is first seen)
    sig = (
        mode, g.dtype, g.is_cpu, g.shape, x.shape[1], k, need_dx, need_dw, sparse_grad,
        torch.get_num_threads(),
    )  # fmt: skip
    tuner = dispatch.tuner()
    name = tuner.memo.get(sig)
    if name is not None:
        return name
    names = candidates(g, mode)
    pin = dispatch.pinned()
    if pin is not None and pin in names:
        name = pin
    elif pin is not None or not dispatch.tuning_enabled() or not g.is_cpu:
        name = names[0]
    else:
        m, n = g.shape
        needs = f"{'x' if need_dx else ''}{'w' if need_dw else ''}{'s' if sparse_grad else ''}"
        cls = dispatch.shape_class(mode, g.dtype, m, n, x.shape[1], k, needs)
        runs = {name: (lambda f=IMPLEMENTATIONS[name]: f(*args)) for name in names}
        name = tuner.choose(cls, runs)
    tuner.memo[sig] = name
    return name
