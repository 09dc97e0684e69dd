"""meProp's sparsified linear map: forward as usual, backward through the top-k of the gradient.

Sun et al., "meProp: Sparsified Back Propagation for Accelerated Deep Learning with Reduced
Overfitting" (ICML 2017). For ``z = x W^T + b`` with ``x`` (M, in), ``W`` (n, in) and the output
gradient ``g = dL/dz`` (M, n), backward keeps only k entries of ``g``:

    g~ = topk(g)        dL/dx ~= g~ W        dL/dW ~= g~^T x        (only rows of g~'s support)

so both products cost about k/n of the dense ones. Leading dimensions of ``x`` (batch, time,
...) are flattened: each row of the (M, in) view is one "example".

Selection (see ``MODES`` in ``meprop.config``):

* ``per_example``: the k largest |g| of each row; index/value form ``idx, vals`` (M, k).
* ``unified``: one column set ``cols`` (k,) per call, the k largest column sums of |g|; the
  products are then compacted dense GEMMs on ``g[:, cols]`` and ``W[cols]``.
* ``random``: k distinct columns per row, uniformly (the paper's control).
* ``symmetric``: per row, the k//2 largest positive and the k - k//2 largest negative entries
  (the sign balance per-example top-k loses; docs/per_example.md).

NaN and inf count as the largest magnitudes, so they propagate as they would in dense backward.

Implementations (``backend``): on float32/float64 CPU tensors the backward runs compiled
kernels, the C++ ones of ``meprop.kernels.native`` where they build (per_example and unified:
one fused call for the selection, dx, dW and the bias sum) or else numba's; PyTorch ops
everywhere else (other dtypes, GPUs) and for ``backend="torch"``.

``meprop.reference.reference_backward`` is the obviously-right version (mask ``g``, then the dense formulas):
the fast paths are tested against it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .adaptive import KRecord, batch_k, row_ks, score_dtype, traced_ks
from .comm import sum_over_ranks
from .config import AdaptiveK, MePropConfig
from .grads import check_not_in_plain_ddp, weight_grad
from .kernels import dispatch

__all__ = [
    "sparse_linear",
    "apply_config",
    "select_rows",
    "select_columns",
    "column_scores",
    "kernels_available",
    "Selection",
    "ROWS_ATTR",
]

# The attribute of a weight Parameter where a DDP communication hook (``meprop.ddp_hook``)
# keeps a row log: an object whose ``add(selection)`` backward calls with what it kept, so the
# hook knows the rows of dW it must all-reduce without reading dW.
ROWS_ATTR = "_meprop_rows"


class Selection(NamedTuple):
    """What one backward kept of the output gradient ``g`` (M, n).

    ``kind``:
      - ``"dense"``: everything (k >= n); ``index`` and ``values`` are None.
      - ``"rows"``: each row its own entries: ``index``, ``values`` (M, k), the columns and
        ``g[i, index[i]]`` (a value may be 0: past an adaptive row's k, or a zero gradient).
      - ``"cols"``: the same columns for every row: ``index`` (k,), ``values = g[:, index]``
        (M, k).
    """

    kind: str
    index: Tensor | None = None
    values: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Selection


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


# --------------------------------------------------------------------------------------------
# Backward products


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
    if backend in ("torch", "dense"):
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


def _bias_grad(g: Tensor, sel: Selection, sparse: bool) -> Tensor:
    """db (n,): from the full gradient (default) or the sparsified one."""
    if not sparse or sel.kind == "dense":
        return g.sum(0)
    db = g.new_zeros(g.shape[1])
    if sel.kind == "cols":
        return db.index_copy_(0, sel.index, sel.values.sum(0))
    return db.index_add_(0, sel.index.flatten(), sel.values.flatten())


def _record(counts: Tensor | None, selections: Tensor | None, sel: Selection, g: Tensor) -> None:
    """Add this call's selections to a usage record (meSimp): no host sync, no Python loop.

    An entry counts when it is kept *and non-zero*: a zero gradient (a unit behind an inactive
    ReLU, or dropped out) moves nothing, and which zeros fill a top-k set is an accident of
    ties. So a unit seldom active for any example is pruned even once its layer is no wider
    than k (where every entry is kept)."""
    if counts is None:
        return
    if sel.kind == "dense":  # g: (M, n), every entry kept
        counts.add_((g != 0).sum(0).to(counts.dtype))
    elif sel.kind == "cols":  # the same k columns serve each of the M rows; values (M, k)
        counts.index_add_(0, sel.index, (sel.values != 0).sum(0).to(counts.dtype))
    else:  # index, values: (M, k)
        counts.index_add_(0, sel.index.flatten(), (sel.values != 0).flatten().to(counts.dtype))
    if selections is not None:
        selections.add_(g.shape[0])


def _rows_products(idx, vals, g, x, weight, kern, need_dx, need_dw, sparse_grad):
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


def _impl_dense(g, x, weight, k, mode, need_dx, need_dw, sparse_grad, full_db):
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
    "dense": _impl_dense,
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
    return [*out, "torch", "dense"]


def _pick(backend: str, args: tuple) -> str:
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


class _SparseLinearFn(torch.autograd.Function):
    """F.linear forward; backward through the top-k of the output gradient.

    ``cfg``: the layer's MePropConfig; ``counts``, ``sel_n``: the meSimp usage record or None;
    ``record``: the layer's KRecord (adaptive k's memory, ``last_k``) or None.

    In the ``setup_context`` form, so torch.func's transforms (``grad``, ``vmap``, ``jacrev``)
    run it; their vmap rule is generated by running backward under vmap, which backward allows
    by taking ``_masked_backward`` (PyTorch ops only) inside a transform. So does a backward
    with ``create_graph=True`` (grad mode on in backward): its products are differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, cfg, counts, sel_n, record, state=None):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, cfg, counts, sel_n, record, state = inputs
        ctx.save_for_backward(x, weight)
        ctx.cfg, ctx.usage, ctx.record, ctx.state = cfg, (counts, sel_n), record, state
        # (no row log while torch.compile traces: the hook then finds the rows in dW)
        ctx.rows = None if torch.compiler.is_compiling() else getattr(weight, ROWS_ATTR, None)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        cfg, record = ctx.cfg, ctx.record
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        n, d_in = weight.shape
        # (M, n) and (M, in): leading dimensions flattened
        g = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, n)
        x2 = x if x.dim() == 2 else x.reshape(-1, d_in)
        k, mode, cols = cfg.k, cfg.mode, None
        compiling = torch.compiler.is_compiling()
        if not compiling and (torch.is_grad_enabled() or _functorch_active()):
            return _masked_backward(ctx, x, x2, weight, g)

        # everything is kept: the dense gradient (on "meta" tensors, which hold no values to
        # select from, the gradients' shapes and dtypes are the dense ones)
        if k >= n or g.is_meta:
            dx = g @ weight if need_dx else None
            dw = g.t() @ x2 if need_dw else None
            if need_dw and cfg.sparse_grad:
                dw = weight_grad(torch.arange(n, device=g.device), dw, n, True)
            return _finish(ctx, x, g, Selection("dense"), dx, dw, need_db)
        ctx.g_in = None
        if cfg.memory:  # select from g + m (memorized sparse back-propagation); g_in for db
            ctx.g_in, ctx.m = g, usable_memory(record, g)
            g = g if ctx.m is None else g + ctx.m
        if cfg.adapt is not None:
            if compiling:
                return _adaptive_traced(ctx, x, x2, weight, g)
            record = record if record is not None else KRecord()
            if mode == "per_example":
                return _adaptive_rows(ctx, x, x2, weight, g.contiguous(), record)
            k, cols = batch_k(column_scores(g, cfg.scope), k, cfg.adapt, record)  # one k a call
        local = mode == "per_example" or (mode == "unified" and cfg.scope == "local")
        if local and not compiling:
            g = g.contiguous()
            full_db = need_db and not cfg.sparse_bias and ctx.g_in is None
            args = (g, x2, weight, k, mode, need_dx, need_dw, cfg.sparse_grad, full_db)
            name = _pick(cfg.backend, args)
            sel, dx, dw, db = IMPLEMENTATIONS[name](*args)
            if need_db and not full_db and ctx.g_in is None:
                db = _bias_grad(g, sel, True)
            return _finish(ctx, x, g, sel, dx, dw, False, db)
        # Random selection, unified selection over all ranks, and torch.compile's tracing.
        if mode == "unified":
            cols = select_columns(g, k, cfg.scope) if cols is None else cols
            gc = g.index_select(1, cols)  # (M, k)
            sel = Selection("cols", cols, gc)
            dx, dw_rows = compact_products(gc, cols, weight, x2, need_dx, need_dw)
            dw = weight_grad(cols, dw_rows, n, cfg.sparse_grad) if need_dw else None
        else:
            g = g.contiguous()
            kern = kernel_module(cfg.backend, g)
            idx, vals = select_rows(g, k, mode, kernels=kern)  # (M, k) each
            sel = Selection("rows", idx, vals)
            dx, dw = _rows_products(idx, vals, g, x2, weight, kern, need_dx, need_dw,
                                    cfg.sparse_grad)  # fmt: skip
        return _finish(ctx, x, g, sel, dx, dw, need_db)


def usable_memory(record, g: Tensor) -> Tensor | None:
    """The layer's memory ``record.memory`` (n,), to add to every row of ``g`` (M, n); None
    where there is none yet, or it was kept for another width (meSimp shrank the layer), dtype
    or device."""
    m = record.memory
    if m is None or m.shape[0] != g.shape[1] or m.dtype != g.dtype or m.device != g.device:
        return None
    return m


def _memorize(ctx, g: Tensor, sel: Selection) -> Tensor:
    """After a backward with memory: the next memory, ``ratio`` times what the selection
    dropped of ``g`` = g_in + m (M, n) as the mean over its rows (the next call's rows are
    other examples: every one of them carries the mean, so the sum over a batch carries the
    dropped sum). Returns the bias gradient's full column sums of g_in (n,), which it reads
    once: g's sums are those plus M m."""
    rows = g.shape[0]
    kept = _bias_grad(g, sel, True)  # (n,) column sums of the kept entries
    full = ctx.g_in.sum(0)  # (n,)
    total = full if ctx.m is None else full + rows * ctx.m
    if rows:
        ctx.record.memory = (total - kept).mul_(ctx.cfg.memory / rows)
    return kept if ctx.cfg.sparse_bias else full


def _adaptive_traced(ctx, x, x2, weight, g):
    """Adaptive k while torch.compile traces backward: the k's stay tensors (no host read).

    The products run on the top k_max (the config's k) of each row (per_example) or of the
    column scores (unified), with the entries past the chosen k set to zero: the gradient of
    the eager path, which cuts the selection to the largest k first. The layer's memory
    (TinyProp's largest error) and ``last_k`` go to ``ctx.state``, the KRecord's tensor."""
    cfg, state = ctx.cfg, ctx.state
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    adapt, k, n = cfg.adapt, cfg.k, weight.shape[0]
    depth = ctx.record.depth if ctx.record is not None else 0
    dt = score_dtype(g.dtype)
    g = g.contiguous()
    past_k = torch.arange(k, device=g.device)  # (k,)
    if cfg.mode == "per_example":
        top, idx = g.abs().topk(k, dim=1, sorted=True)  # (M, k) each, descending
        top = top.to(dt)
        ks, y_max = traced_ks(top, g, k, adapt, depth, _state_y_max(state, g))  # (M,)
        vals = g.gather(1, idx).masked_fill(past_k >= ks.unsqueeze(1), 0)  # (M, k)
        sel = Selection("rows", idx, vals)
        kern = kernel_module(cfg.backend, g) if cfg.backend != "dense" else None
        dx, dw = _rows_products(idx, vals, g, x2, weight, kern, need_dx, need_dw, cfg.sparse_grad)
        mean_k = ks.sum() / max(g.shape[0], 1)
    else:
        scores = column_scores(g, cfg.scope)  # (n,)
        top, cols = scores.topk(k, sorted=True)  # (k,)
        kk, y_max = traced_ks(top.unsqueeze(0), scores.unsqueeze(0), k, adapt, depth,
                              _state_y_max(state, g), batch=True)  # fmt: skip
        gc = g.index_select(1, cols).masked_fill(past_k >= kk, 0)  # (M, k)
        sel = Selection("cols", cols, gc)
        dx, dw_rows = compact_products(gc, cols, weight, x2, need_dx, need_dw)
        dw = weight_grad(cols, dw_rows, n, cfg.sparse_grad) if need_dw else None
        mean_k = kk.sum()
    if state is not None:
        new = torch.stack([y_max.to(torch.float64), mean_k.to(torch.float64)])
        state[:2].copy_(new.to(state.device))
        state[2].fill_(1)
    return _finish(ctx, x, g, sel, dx, dw, need_db)


def _state_y_max(state: Tensor | None, g: Tensor) -> Tensor:
    """TinyProp's largest error so far, on g's device, in g's score dtype (0 without state)."""
    if state is None:
        return g.new_zeros((), dtype=score_dtype(g.dtype))
    return state[0].to(device=g.device, dtype=score_dtype(g.dtype))


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def _masked_backward(ctx, x, x2, weight, g):
    """The reference backward in PyTorch ops only: g~ (M, n) the output gradient masked to the
    selection, then the dense products ``g~ W``, ``g~^T x``.

    What a backward with ``create_graph=True`` runs (every product is differentiable in g, x
    and W; the selection is a constant of the second-order graph, as a ReLU's mask is) and
    what torch.func's transforms run (no compiled kernels, no data-dependent shapes: vmap
    runs it per example). Refuses, by name, what it cannot do."""
    cfg = ctx.cfg
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    where = "under a torch.func transform" if _functorch_active() else "with create_graph=True"
    what = f"SparseLinear(k={cfg.k}, mode={cfg.mode})"
    if cfg.sparse_grad and need_dw:
        raise RuntimeError(
            f"{what}: sparse_grad=True cannot run {where} (a row-sparse COO weight gradient has "
            "no higher-order or batched form); use MePropConfig(sparse_grad=False) there"
        )
    if cfg.memory and cfg.k < weight.shape[0]:
        raise RuntimeError(
            f"{what}: memory={cfg.memory:g} (memorized sparse back-propagation) cannot run "
            f"{where}: backward carries the dropped gradient to the next step outside the "
            "graph; use MePropConfig(memory=0) there"
        )
    if cfg.adapt is not None and _functorch_active():
        raise RuntimeError(
            f"{what}: adaptive k (MePropConfig(adapt=...)) cannot run {where}: it reads each "
            "backward's k on the host; use a fixed k (adapt=None)"
        )
    if ctx.usage[0] is not None and _functorch_active():
        raise RuntimeError(
            f"{what}: meSimp's usage record cannot be kept {where} (backward adds to it in "
            "place); detach the Simplifier, or train without the transform"
        )
    n = weight.shape[0]
    k = cfg.k
    if k >= n:
        sel, gm = Selection("dense"), g
    elif cfg.adapt is not None:
        record = ctx.record if ctx.record is not None else KRecord()
        if cfg.mode == "per_example":
            idx, vals, _, _ = row_ks(g, k, cfg.adapt, record)  # (M, K), zero past a row's k
            sel, gm = Selection("rows", idx, vals), _scatter_rows(g, idx, vals)
        else:
            _, cols = batch_k(column_scores(g.detach(), cfg.scope), k, cfg.adapt, record)
            sel, gm = _mask_cols(g, cols)
    elif cfg.mode == "unified":
        sel, gm = _mask_cols(g, select_columns(g.detach(), k, cfg.scope))
    else:
        idx, vals = select_rows(g, k, cfg.mode)  # vals gathered from g: differentiable
        sel, gm = Selection("rows", idx, vals), _scatter_rows(g, idx, vals)
    dx = gm @ weight if need_dx else None  # (M, in)
    dw = gm.t() @ x2 if need_dw else None  # (n, in)
    db = (gm if cfg.sparse_bias else g).sum(0) if need_db else None
    if ctx.usage[0] is not None:
        with torch.no_grad():
            _record(*ctx.usage, sel, g)
    if dx is not None and x.dim() != 2:
        dx = dx.reshape(x.shape)
    return dx, dw, db, None, None, None, None, None


def _scatter_rows(g: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
    """g~ (M, n): ``vals`` (M, k) at ``idx``, zeros elsewhere (added: symmetric's double
    picks carry their value once and 0 once)."""
    return torch.zeros_like(g).scatter_add(1, idx, vals)


def _mask_cols(g: Tensor, cols: Tensor) -> tuple[Selection, Tensor]:
    """Unified: g~ (M, n) keeps the columns ``cols`` (k,) of g."""
    gc = g.index_select(1, cols)  # (M, k)
    return Selection("cols", cols, gc), torch.zeros_like(g).index_copy(1, cols, gc)


def _adaptive_rows(ctx, x, x2, weight, g, record):
    """Per-example adaptive k: each row keeps its own number of its largest |g| (at most the
    config's k); the products run on (M, K) selections, K the batch's largest k, whose entries
    past a row's k are zero."""
    cfg = ctx.cfg
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    adapt = cfg.adapt
    kern = kernel_module(cfg.backend, g) if cfg.backend != "dense" else None
    if getattr(kern, "per_example_backward_var", None) is not None:  # the C++ kernels: fused
        full_db = need_db and not cfg.sparse_bias
        dw_kind = ("sparse" if cfg.sparse_grad else "dense") if need_dw else None
        idx, vals, ks, y_max, dx, dw, db = kern.per_example_backward_var(
            g, x2.contiguous(), weight.contiguous(), cfg.k, adapt, record.y_max, record.depth,
            need_dx, dw_kind, full_db,
        )  # fmt: skip
        record.y_max = y_max
        record.last_k = ks.sum().item() / len(ks) if len(ks) else None  # (CPU: no sync)
        if dw_kind == "sparse":
            dw = weight_grad(*dw, weight.shape[0], True)
        sel = Selection("rows", idx, vals)
        return _finish(ctx, x, g, sel, dx, dw, need_db and not full_db, db)
    idx, vals, _, _ = row_ks(g, cfg.k, adapt, record, kern)  # (M, K), K the largest k
    dx, dw = _rows_products(idx, vals, g, x2, weight, kern, need_dx, need_dw, cfg.sparse_grad)
    return _finish(ctx, x, g, Selection("rows", idx, vals), dx, dw, need_db)


def _finish(ctx, x, g, sel: Selection, dx, dw, need_db, db=None):
    """Bias gradient, usage record, memory, and backward's return tuple (one entry per forward
    input)."""
    if getattr(ctx, "g_in", None) is not None:  # memory: keep what the selection dropped
        bias = _memorize(ctx, g, sel)  # db from the layer's own gradient, as without memory
        db, need_db = (bias if ctx.needs_input_grad[2] else None), False
    if need_db:
        db = _bias_grad(g, sel, ctx.cfg.sparse_bias)
    _record(*ctx.usage, sel, g)
    if ctx.rows is not None and dw is not None:
        ctx.rows.add(sel)
    if dx is not None and x.dim() != 2:
        dx = dx.reshape(x.shape)
    return dx, dw, db, None, None, None, None, None


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    k: int = 20,
    mode: str = "per_example",
    *,
    sparse_bias: bool = False,
    sparse_grad: bool = False,
    backend: str = "auto",
    scope: str = "local",
    counts: Tensor | None = None,
    selections: Tensor | None = None,
    adapt: AdaptiveK | None = None,
    record: KRecord | None = None,
    memory: float = 0.0,
    warmup: int = 0,
) -> Tensor:
    """``F.linear(x, weight, bias)`` whose backward keeps only the top-k output-gradient entries.

    Args:
        x: input (*, in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        k: entries kept per row (``per_example``, ``random``) or columns per call (``unified``).
            ``k >= out_features`` gives exactly the dense gradients.
        mode: ``"per_example"``, ``"unified"`` or ``"random"``.
        sparse_bias: bias gradient from the sparsified gradient instead of the full one.
        sparse_grad: return the weight gradient as a row-sparse COO tensor.
        backend: ``"auto"`` (the fastest here, timed on first use), ``"native"`` (C++),
            ``"numba"``, ``"torch"``, ``"dense"`` or ``"triton"`` (see ``MePropConfig``).
        scope: ``"local"`` or ``"global"``: whether ``unified`` ranks columns by this
            process's rows or by the rows of all ranks (see ``MePropConfig``).
        counts: optional (out_features,) tensor; backward adds, per output unit, how many rows
            selected it (the meSimp usage record).
        selections: optional one-element tensor; backward adds the number of selections made.
        adapt: an ``AdaptiveK``: choose each backward's k in ``[adapt.min_k, k]``.
        record: a ``meprop.adaptive.KRecord``: backward sets its ``last_k`` and keeps adaptive
            k's memory there across calls (without one, each call starts afresh); needed for
            ``memory`` and ``warmup``.
        memory: memorized sparse back-propagation's ratio (``MePropConfig.memory``; 0: off).
        warmup: dense forward passes before top-k starts (``MePropConfig.warmup``).

    Example:
        >>> x = torch.randn(8, 50, requires_grad=True)
        >>> w = torch.randn(30, 50, requires_grad=True)
        >>> sparse_linear(x, w, None, k=5).sum().backward()
        >>> int((w.grad != 0).any(1).sum()) <= 8 * 5
        True
    """
    cfg = MePropConfig(
        k=k,
        mode=mode,
        sparse_bias=sparse_bias,
        sparse_grad=sparse_grad,
        backend=backend,
        scope=scope,
        adapt=adapt,
        memory=memory,
        warmup=warmup,
    )
    return apply_config(x, weight, bias, cfg, counts, selections, record)


def apply_config(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cfg: MePropConfig,
    counts: Tensor | None = None,
    selections: Tensor | None = None,
    record: KRecord | None = None,
) -> Tensor:
    """``sparse_linear`` with an already validated config (the modules' hot path)."""
    n = weight.shape[0]
    if cfg.warmup and record is not None and record.calls < cfg.warmup and _builds_graph(x, weight):
        record.calls += 1  # a warm-up step: the dense layer
        record.last_k = float(n)
        return F.linear(x, weight, bias)
    if record is not None and (cfg.adapt is None or cfg.k >= n):
        # A fixed k is known now; backward then changes no state outside the graph (which
        # torch.compile would have to break on). Adaptive k's record and the memory go to
        # backward.
        record.last_k = float(min(cfg.k, n))
        if not cfg.memory or cfg.k >= n:
            record = None
    if cfg.memory and cfg.k < n:
        if torch.compiler.is_compiling():
            # (without fullgraph, Dynamo breaks the graph here and runs the layer eagerly)
            raise RuntimeError(
                f"MePropConfig(memory={cfg.memory:g}) does not trace under "
                "torch.compile(fullgraph=True): backward keeps the dropped gradient in the "
                "layer's record between steps; compile without fullgraph (the layer then runs "
                "eagerly) or use memory=0"
            )
        if record is None:
            raise ValueError(
                "MePropConfig(memory=...) keeps the dropped gradient between calls: pass "
                "record=meprop.adaptive.KRecord() (one per layer) to sparse_linear, or use "
                "SparseLinear"
            )
    if counts is None and cfg.k >= n and not cfg.sparse_grad:
        return F.linear(x, weight, bias)  # keeps everything: plain autograd, bit-exact
    if cfg.sparse_grad:
        check_not_in_plain_ddp(f"a meProp linear layer ({n} outputs, k={cfg.k})")
    state = None
    if record is not None and torch.compiler.is_compiling():
        state = record.state  # adaptive k's memory, as a tensor the traced backward updates
    args = (cfg, counts, selections, record, state)
    dtype = autocast_dtype(x)
    if dtype is None:
        return _SparseLinearFn.apply(x, weight, bias, *args)
    # Under autocast, F.linear's policy: the casts are autograd ops, so backward (inside or
    # outside the autocast block) sees g, x and W in one dtype, and dW goes back to the
    # parameter's dtype through the cast's backward.
    x, weight, bias = (autocast_cast(t, dtype) for t in (x, weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        return _SparseLinearFn.apply(x, weight, bias, *args)


def _builds_graph(x: Tensor, weight: Tensor) -> bool:
    """Whether this forward builds a graph for backward (a training step, not an evaluation)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs linear maps in for tensors on ``t``'s device, or None
    where autocast is off there."""
    dev = t.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
    except RuntimeError:  # a device autocast does not know ("meta"): as F.linear, no autocast
        return None
    return torch.get_autocast_dtype(dev)


def autocast_cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` as autocast casts an op's arguments: floating tensors other than
    float64 only (float64 runs as it is, as under autocast)."""
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return _Cast.apply(t, dtype)


class _Cast(torch.autograd.Function):
    """``t.to(dtype)`` whose backward casts the gradient back keeping its layout: a row-sparse
    dW (``sparse_grad``) stays sparse, where autograd's own cast backward fails on COO."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t, dtype):
        return t.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None
