"""The compiled CPU kernels against plain PyTorch references.

Two implementations of the same operations: ``meprop.kernels.native`` (C++, built on first
use) and ``meprop.kernels.cpu`` (numba). Each runs serially (1 thread) and with its parallel
paths forced (the ``kern`` fixture); ``torch.ops.meprop.*`` (``meprop.kernels.registry``) runs
whichever is available. References: ``g.abs().topk`` for the selection (NaN ranks highest in
torch too), and the dense products of the scattered g~. The native fused backward
(``per_example_backward``, ``unified_backward``) is checked against ``meprop.ops``'s reference.
"""

import itertools

import pytest
import torch

from meprop.kernels import build, checks, cpu, native, pool, registry
from meprop.ops import select_columns
from meprop.reference import mask_gradient

FLOATS = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
MS = [0, 1, 7, 64]
NS = [1, 5, 500]
INS = [1, 3, 300]


# The C++ kernels are tested in every build this machine can run: the default (-march=native,
# or $MEPROP_MARCH) and, on x86-64, the AVX2 (x86-64-v3: 32-byte vectors) and baseline
# (x86-64: SSE2, 16-byte vectors) levels, whose vector code differs.
BUILDS = [native.march()] + [
    a for a in ("x86-64-v3", "x86-64") if a != native.march() and native.cpu_supports(a)
]


def _build_param(arch: str, path: str, extra=()):
    why = None if native.available(arch) else native.build_error(arch)
    mark = pytest.mark.skipif(why is not None, reason=str(why))
    name = "native" if arch == native.march() else f"native[{arch}]"
    return pytest.param((native, arch, path, *extra), id=f"{name}-{path}", marks=mark)


def _impl_params():
    why = None if cpu.available() else "numba unavailable"
    mark = pytest.mark.skipif(why is not None, reason=str(why))
    out = [
        pytest.param((cpu, None, p), id=f"numba-{p}", marks=mark) for p in ("serial", "parallel")
    ]
    for arch in BUILDS:
        out += [_build_param(arch, p) for p in ("serial", "parallel")]
    return out


needs_native = pytest.mark.skipif(not native.available(), reason=str(native.build_error()))


def _run_as(request, monkeypatch):
    """Set up request.param = (module, build, path): the build's library active, 1 thread
    (serial) or 2 with the parallel paths forced; returns the thread count to restore."""
    impl, arch, path = request.param[:3]
    before = torch.get_num_threads()
    if path == "serial":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(2)
        monkeypatch.setattr(cpu, "_PAR_MIN_NS", 0)
        monkeypatch.setattr(native, "_PAR_MIN_ENTRIES", 0)
        monkeypatch.setattr(native, "_PAR_MIN_FMAS", 0)
    if arch is not None:
        monkeypatch.setattr(build, "_active", [arch])
    return before


@pytest.fixture(params=_impl_params())
def kern(request, monkeypatch):
    """An implementation module (numba, or a C++ build), run serially (1 thread) or with its
    parallel paths forced."""
    before = _run_as(request, monkeypatch)
    yield request.param[0]
    torch.set_num_threads(before)


def ks(n):
    return sorted({1, max(1, n // 3), n})


def dense_g(idx, vals, n):
    """g~ (M, n) from the index/value form; duplicate indices add up."""
    g = torch.zeros(idx.shape[0], n, dtype=vals.dtype)
    return g.scatter_add_(1, idx, vals)


def check_topk(g, k, idx, vals):
    """idx/vals are a valid top-k of g: distinct in-range columns, vals = g[idx], and the
    selected magnitudes (sorted) equal torch's. Ties may pick different columns."""
    m, n = g.shape
    assert idx.shape == vals.shape == (m, k)
    assert idx.dtype == torch.int64 and vals.dtype == g.dtype
    if m == 0:
        return
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert all(len(set(row)) == k for row in idx.tolist())
    torch.testing.assert_close(vals, g.gather(1, idx), rtol=0, atol=0, equal_nan=True)
    want = g.abs().topk(k, dim=1).values.sort(dim=1).values
    got = vals.abs().sort(dim=1).values
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# topk_rows


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_rows_shapes(kern, dtype):
    for m, n in itertools.product(MS, NS):
        g = torch.randn(m, n, dtype=dtype)
        for k in ks(n):
            check_topk(g, k, *kern.topk_rows(g, k))
            check_topk(g, k, *torch.ops.meprop.topk_rows(g, k))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "kind", ["ties", "zeros", "relu", "nan", "inf", "nan_inf", "wide_range", "tiny", "sorted"]
)
def test_topk_rows_values(kern, dtype, kind):
    m, n = 9, 500
    g = torch.randn(m, n, dtype=dtype)
    if kind == "ties":  # few distinct magnitudes: many ties at the threshold
        g = (g * 2).round()
    elif kind == "zeros":
        g = torch.zeros(m, n, dtype=dtype)
    elif kind == "relu":  # most entries exactly zero, as behind a ReLU
        g = g * (torch.rand(m, n) < 0.1)
    elif kind == "nan":
        g[:, ::7] = float("nan")
        g[3] = float("nan")
    elif kind == "inf":
        g[:, 1::11] = float("inf")
        g[:, 2::13] = -float("inf")
    elif kind == "nan_inf":
        g[:, ::17] = float("nan")
        g[:, 5::9] = -float("inf")
    elif kind == "wide_range":  # exponents all over the type's range
        g = g * 10.0 ** torch.randint(-30, 30, (m, n)).to(dtype)
    elif kind == "tiny":  # subnormals and zeros
        g = torch.randint(-2, 3, (m, n)).to(dtype) * torch.finfo(dtype).tiny / 8
    elif kind == "sorted":  # increasing magnitudes: the worst order for a heap
        g = torch.linspace(-1, 1, n, dtype=dtype).repeat(m, 1)
    for k in (1, 2, 10, 80, 499, 500):
        idx, vals = kern.topk_rows(g, k)
        check_topk(g, k, idx, vals)
        # NaNs are always selected, as many as fit.
        nans = torch.isnan(g).sum(1).clamp(max=k)
        assert torch.equal(torch.isnan(vals).sum(1), nans)


@pytest.mark.parametrize("k", [1, 3, 40, 100, 150])
def test_topk_rows_ties_prefer_lower_columns(kern, k):
    # All magnitudes equal (signs differ): the documented choice is the first k columns.
    g = torch.ones(5, 150, dtype=torch.float64)
    g[:, 1::2] = -1
    idx, vals = kern.topk_rows(g, k)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(k).expand(5, k))
    torch.testing.assert_close(vals, g.gather(1, idx), rtol=0, atol=0)


def test_topk_rows_noncontiguous_and_requires_grad(kern):
    g = torch.randn(300, 40, dtype=torch.float64).t()  # (40, 300), not contiguous
    check_topk(g, 7, *kern.topk_rows(g, 7))
    g = torch.randn(5, 30, requires_grad=True)
    check_topk(g.detach(), 4, *kern.topk_rows(g, 4))


def test_topk_rows_bad_k(kern):
    g = torch.randn(3, 5)
    for k in (0, -1, 6):
        with pytest.raises(ValueError, match=f"k={k}"):
            kern.topk_rows(g, k)
        with pytest.raises(ValueError, match=f"k={k}"):
            torch.ops.meprop.topk_rows(g, k)


def test_topk_rows_bad_inputs(kern):
    with pytest.raises(TypeError, match="float32/float64"):
        kern.topk_rows(torch.randn(3, 5).half(), 2)
    with pytest.raises(TypeError, match="float32/float64"):
        kern.topk_rows(torch.ones(3, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="g must be"):
        kern.topk_rows(torch.randn(5), 2)


# --------------------------------------------------------------------------------------------
# rows_matmul, rows_outer, rows_outer_dense


def products_case(kern, m, n, d, k, dtype, dup):
    """(idx, vals, weight, x): idx from topk_rows, or with heavy duplication (``dup``): every
    row picks among the same few columns, repeats within a row included."""
    if dup:
        idx = torch.randint(0, min(n, 3), (m, k))
    else:
        idx = kern.topk_rows(torch.randn(m, n, dtype=dtype), k)[0]
    vals = torch.randn(m, k, dtype=dtype)
    return idx, vals, torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)


def check_products(kern, idx, vals, weight, x, n):
    g = dense_g(idx, vals, n)
    tol = TOL[vals.dtype]
    for matmul in (kern.rows_matmul, torch.ops.meprop.rows_matmul):
        dx = matmul(idx, vals, weight)
        assert dx.shape == (idx.shape[0], weight.shape[1]) and dx.dtype == vals.dtype
        torch.testing.assert_close(dx, g @ weight, **tol)
    dw = g.t() @ x
    for outer in (kern.rows_outer, torch.ops.meprop.rows_outer):
        rows, dw_rows = outer(idx, vals, x, n)
        assert rows.dtype == torch.int64 and dw_rows.dtype == vals.dtype
        assert torch.equal(rows, idx.flatten().unique())  # sorted, distinct
        assert dw_rows.shape == (rows.shape[0], x.shape[1])
        torch.testing.assert_close(dw_rows, dw[rows], **tol)
    for dense in (kern.rows_outer_dense, torch.ops.meprop.rows_outer_dense):
        torch.testing.assert_close(dense(idx, vals, x, n), dw, **tol)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dup", [False, True], ids=["topk", "duplicates"])
def test_products_shapes(kern, dtype, dup, request):
    for m, n, d in itertools.product(MS, NS, INS):
        for k in ks(n):
            # The forced-parallel runs skip some middle shapes: on a busy machine every tiny
            # parallel launch can wait milliseconds for a descheduled thread.
            if "parallel" in request.node.callspec.id and (m == 7 or n == 1 or d == 1 or 1 < k < n):
                continue
            check_products(kern, *products_case(kern, m, n, d, k, dtype, dup), n)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_products_wide(kern, dtype, big, monkeypatch):
    # Wider than a column block, few rows: the blocked task split (and its remainder block).
    # big: the path for large outputs (numpy-allocated; numba: two calls).
    if big:
        monkeypatch.setattr(checks, "BIG_BYTES", 0)
    for m, k in [(0, 3), (1, 5), (3, 17), (40, 8)]:
        check_products(kern, *products_case(kern, m, 600, 1111, k, dtype, False), 600)
    for dup in (False, True):
        check_products(kern, *products_case(kern, 7, 5, 3, 2, dtype, dup), 5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_products_cache_tiled(kern, dtype):
    # A source (x: 600 x 1800, W: 300 x 1800) over 2 MiB whose rows are each read >= 16 times:
    # the native products split the columns into blocks that stay in L2 (and a last block).
    for dup in (False, True):
        check_products(kern, *products_case(kern, 600, 300, 1800, 16, dtype, dup), 300)


def test_products_k_zero_and_n_zero(kern):
    idx = torch.empty(4, 0, dtype=torch.int64)
    vals = torch.empty(4, 0)
    assert torch.equal(kern.rows_matmul(idx, vals, torch.randn(6, 3)), torch.zeros(4, 3))
    rows, dw_rows = kern.rows_outer(idx, vals, torch.randn(4, 3), 6)
    assert rows.shape == (0,) and dw_rows.shape == (0, 3)
    assert torch.equal(kern.rows_outer_dense(idx, vals, torch.randn(4, 3), 6), torch.zeros(6, 3))
    assert kern.rows_outer_dense(idx, vals, torch.randn(4, 3), 0).shape == (0, 3)


def test_products_noncontiguous(kern):
    idx = kern.topk_rows(torch.randn(6, 20), 4)[0]
    vals = torch.randn(4, 6).t()
    weight = torch.randn(9, 20).t()  # (20, 9)
    x = torch.randn(9, 6).t()  # (6, 9)
    check_products(kern, idx, vals, weight, x, 20)


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_products_bad_indices(kern, big, monkeypatch):
    if big:
        monkeypatch.setattr(checks, "BIG_BYTES", 0)
    idx = torch.tensor([[0, 5], [1, 2]])
    vals = torch.randn(2, 2)
    with pytest.raises(IndexError, match="1 value"):
        kern.rows_matmul(idx, vals, torch.randn(5, 3))
    with pytest.raises(IndexError, match="1 value"):
        kern.rows_outer(idx, vals, torch.randn(2, 3), 5)
    with pytest.raises(IndexError, match="3 value"):  # -5, -1, -2
        kern.rows_outer_dense(-idx, vals, torch.randn(2, 3), 5)
    with pytest.raises(IndexError, match="outside"):
        torch.ops.meprop.rows_matmul(idx, vals, torch.randn(5, 3))
    # A bad index inside a group of four (the kernels' unrolled step) is found too.
    idx = torch.tensor([[0, 1, 9, 2, 3, 4], [4, 3, 2, 1, 0, 1]])
    vals = torch.randn(2, 6)
    with pytest.raises(IndexError, match="1 value"):
        kern.rows_matmul(idx, vals, torch.randn(5, 3))
    with pytest.raises(IndexError, match="1 value"):
        kern.rows_outer(idx, vals, torch.randn(2, 3), 5)


def test_products_bad_inputs(kern):
    idx, vals = torch.tensor([[0, 1]]), torch.randn(1, 2)
    with pytest.raises(TypeError, match="int64"):
        kern.rows_matmul(idx.int(), vals, torch.randn(5, 3))
    with pytest.raises(ValueError, match="dtype of vals"):
        kern.rows_matmul(idx, vals, torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="M=1 rows"):
        kern.rows_outer(idx, vals, torch.randn(2, 3), 5)
    with pytest.raises(ValueError, match=r"\(M, k\)"):
        kern.rows_outer(idx, vals[:, :1], torch.randn(1, 3), 5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_products_wide_rows_keep_inf(kern, dtype, big, monkeypatch):
    # Rows of >= 4 KiB take the row-streaming paths, whose first pass stores up to four rows
    # (big: with streaming stores). Rows named 1 to 5 times, an inf in x: the sums must be
    # inf where the reference's are, never NaN from a padded 0 * inf.
    if big:
        monkeypatch.setattr(checks, "BIG_BYTES", 0)
    n, d = 6, 1100
    idx = torch.tensor([[0, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 3], [4, 4, 4], [5, 0, 1]])
    vals = torch.rand(6, 3, dtype=dtype) + 0.5
    x = torch.randn(6, d, dtype=dtype)
    x[1, 7] = float("inf")
    want = torch.zeros(n, d, dtype=dtype).index_add_(
        0, idx.flatten(), vals.flatten()[:, None] * x.repeat_interleave(3, 0)
    )
    got = kern.rows_outer_dense(idx, vals, x, n)
    torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=False)
    rows, dw_rows = kern.rows_outer(idx, vals, x, n)
    torch.testing.assert_close(dw_rows, want[rows], **TOL[dtype])
    w = torch.randn(n, d, dtype=dtype)
    w[2, 9] = -float("inf")
    want_dx = (vals[:, :, None] * w[idx]).sum(1)
    torch.testing.assert_close(kern.rows_matmul(idx, vals, w), want_dx, **TOL[dtype])


# --------------------------------------------------------------------------------------------
# Registration, helpers, threads


def test_registry_picks_native_first():
    assert registry.implementation() is (native if native.available() else cpu)


def test_opcheck():
    g = torch.randn(4, 9, dtype=torch.float64)
    idx, vals = registry.implementation().topk_rows(g, 3)
    w, x = torch.randn(9, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.meprop.topk_rows.default, (g, 3))
    torch.library.opcheck(torch.ops.meprop.rows_matmul.default, (idx, vals, w))
    torch.library.opcheck(torch.ops.meprop.rows_outer.default, (idx, vals, x, 9))
    torch.library.opcheck(torch.ops.meprop.rows_outer_dense.default, (idx, vals, x, 9))


@pytest.mark.parametrize("impl", [cpu, native], ids=["numba", "native"])
def test_supports(impl):
    assert impl.supports(torch.randn(2))
    assert impl.supports(torch.randn(2, dtype=torch.float64))
    assert not impl.supports(torch.randn(2).half())
    assert not impl.supports(torch.randn(2).to_sparse())
    assert not impl.supports(torch.ones(2, dtype=torch.int64))


def test_threads_follow_torch():
    numba = pytest.importorskip("numba")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cpu.topk_rows(torch.randn(3, 4), 2)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(2)
        cpu.topk_rows(torch.randn(3, 4), 2)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


def test_torch_compile_traces_ops():
    # fullgraph: no graph break at the ops (fake impls, rows_outer's data-dependent size);
    # aot_eager keeps it quick while still running the fake tensors through AOTAutograd.
    def backward_products(g, w, x, k: int):
        idx, vals = torch.ops.meprop.topk_rows(g, k)
        dx = torch.ops.meprop.rows_matmul(idx, vals, w)
        rows, dw_rows = torch.ops.meprop.rows_outer(idx, vals, x, g.shape[1])
        dw = torch.zeros(g.shape[1], x.shape[1]).index_copy_(0, rows, dw_rows)
        return dx * 2, dw + 1, torch.ops.meprop.rows_outer_dense(idx, vals, x, g.shape[1])

    compiled = torch.compile(backward_products, fullgraph=True, backend="aot_eager")
    w = torch.randn(50, 30)
    for m in (8, 16):  # the second size recompiles with dynamic shapes
        g, x = torch.randn(m, 50), torch.randn(m, 30)
        for got, want in zip(compiled(g, w, x, 5), backward_products(g, w, x, 5), strict=True):
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# The fused backward of the C++ kernels


@pytest.fixture(params=[_build_param(a, p) for a in BUILDS for p in ("serial", "parallel")])
def fused(request, monkeypatch):
    """meprop.kernels.native (each build), run serially or with its parallel paths forced."""
    before = _run_as(request, monkeypatch)
    yield native
    torch.set_num_threads(before)


FUSED_SHAPES = [(0, 9, 4, 3), (1, 9, 4, 1), (7, 13, 11, 12), (64, 500, 300, 20), (5, 600, 1111, 17)]
# x and W over 2 MiB, each row read >= 16 times: the products run in cache-sized column blocks
FUSED_SHAPES.append((600, 300, 1800, 16))


def check_dw(dw, kind, g_sparse, x, tol):
    want = g_sparse.t() @ x
    if kind == "dense":
        torch.testing.assert_close(dw, want, **tol)
    elif kind == "sparse":
        rows, dw_rows = dw
        assert torch.equal(rows, (g_sparse != 0).any(0).nonzero().flatten())
        torch.testing.assert_close(dw_rows, want[rows], **tol)
    else:
        assert dw is None


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["dense", "sparse", None])
@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_per_example_backward(fused, dtype, kind, big, monkeypatch):
    if big:  # large dense dW: zeroed by numpy (calloc), touched rows written only
        monkeypatch.setattr(checks, "BIG_BYTES", 0)
    tol = TOL[dtype]
    for m, n, d, k in FUSED_SHAPES:
        g, x, w = (torch.randn(*s, dtype=dtype) for s in ((m, n), (m, d), (n, d)))
        idx, vals, dx, dw, db = fused.per_example_backward(g, x, w, k, True, kind, True)
        check_topk(g, k, idx, vals)
        gs = mask_gradient(g, k, "per_example")
        torch.testing.assert_close(dense_g(idx, vals, n), gs, rtol=0, atol=0)
        torch.testing.assert_close(dx, gs @ w, **tol)
        torch.testing.assert_close(db, g.sum(0), **tol)
        check_dw(dw, kind, gs, x, tol)
    _, _, dx, _, db = fused.per_example_backward(g, x, w, k, False, kind, False)
    assert dx is None and db is None


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["dense", "sparse", None])
@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_unified_backward(fused, dtype, kind, big, monkeypatch):
    if big:
        monkeypatch.setattr(checks, "BIG_BYTES", 0)
    tol = TOL[dtype]
    for m, n, d, k in FUSED_SHAPES:
        g, x, w = (torch.randn(*s, dtype=dtype) for s in ((m, n), (m, d), (n, d)))
        cols, gc, dx, dw, db = fused.unified_backward(g, x, w, k, True, kind, True)
        if m:  # (no rows: every score is zero, any k columns will do)
            assert torch.equal(cols, select_columns(g, k))
        assert torch.equal(cols, cols.unique()) and cols.shape == (k,)
        torch.testing.assert_close(gc, g[:, cols], rtol=0, atol=0)
        gs = mask_gradient(g, k, "unified", cols)
        torch.testing.assert_close(dx, gs @ w, **tol)
        torch.testing.assert_close(db, g.sum(0), **tol)
        if kind == "sparse":  # all k selected rows, zero ones included
            torch.testing.assert_close(dw[1], (gs.t() @ x)[cols], **tol)
            assert dw[0] is cols
        else:
            check_dw(dw, kind, gs, x, tol)


def test_top_columns(fused):
    for m, n, k in [(1, 5, 2), (7, 13, 13), (64, 500, 20), (3, 600, 1)]:
        g = torch.randn(m, n, dtype=torch.float64)
        assert torch.equal(fused.top_columns(g, k), select_columns(g, k))
    g[1, 4] = float("nan")
    assert 4 in fused.top_columns(g, 1).tolist()
    with pytest.raises(ValueError, match="k=0"):
        fused.top_columns(g, 0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_channel_topk_mask(fused, dtype):
    """SparseConv2d's per_position selection: at each (example, position) the k channels of
    largest |g|, as torch.topk over the channel dimension picks them. Both of the kernel's
    paths (up to 32 channels: ranks counted; more: rows of transposed positions), each over
    several blocks of positions and a partial one."""
    shapes = [((3, 5, 7, 3), 2), ((2, 7, 1, 1), 6), ((4, 16, 10, 10), 1), ((2, 7, 20, 20), 3),
              ((2, 32, 17, 19), 31), ((2, 33, 17, 19), 5), ((1, 300, 3, 3), 7),
              ((2, 64, 9, 15), 30), ((0, 4, 2, 2), 1)]  # fmt: skip
    for shape, k in shapes:
        g = torch.randn(shape, dtype=dtype)
        if g.numel():
            g[0, 0, 0, 0], g[-1, 1, -1, -1] = float("nan"), float("-inf")  # ranked first
        want = torch.zeros(shape, dtype=torch.bool).scatter_(1, g.abs().topk(k, 1).indices, True)
        assert torch.equal(fused.channel_topk_mask(g, k), want), (shape, k)
    # ties: the lower channels win (zeros here), as in topk_rows
    g = torch.zeros(2, 9, 3, 3, dtype=dtype)
    g[:, 4] = -1.0
    for k in (1, 2, 3):
        keep = fused.channel_topk_mask(g, k)
        assert keep[:, 4].all() and keep[:, : k - 1].all() and int(keep.sum()) == 2 * 9 * k
    nchw = torch.randn(2, 12, 5, 5, dtype=dtype)
    cl = nchw.contiguous(memory_format=torch.channels_last)  # (copied to NCHW first)
    assert torch.equal(fused.channel_topk_mask(cl, 3), fused.channel_topk_mask(nchw, 3))
    with pytest.raises(ValueError, match="k=12"):
        fused.channel_topk_mask(nchw, 12)
    with pytest.raises(ValueError, match="shape"):
        fused.channel_topk_mask(nchw[0], 3)
    with pytest.raises(TypeError, match="float32/float64"):
        fused.channel_topk_mask(nchw.half(), 3)


def test_fused_nan_inf_selected_first(fused):
    g = torch.randn(4, 300) * 1e-3
    g[1, 7] = float("nan")
    g[2, 9] = -float("inf")
    x, w = torch.randn(4, 5), torch.randn(300, 5)
    idx, vals, dx, dw, _ = fused.per_example_backward(g, x, w, 1, True, "dense", False)
    assert idx[1, 0] == 7 and idx[2, 0] == 9
    assert torch.isnan(dx[1]).all() and torch.isnan(dw[7]).all() and torch.isinf(dw[9]).all()
    cols, _, dx, _, _ = fused.unified_backward(g, x, w, 2, True, None, False)
    assert set(cols.tolist()) == {7, 9} and torch.isnan(dx[1]).all() and torch.isinf(dx[2]).any()


def test_native_disabled_falls_back(tmp_path):
    # MEPROP_NATIVE=0: no build, available() is False with the reason, and meprop's backward
    # runs on the numba kernels (or PyTorch ops) instead.
    import os
    import subprocess
    import sys

    code = (
        "import torch; from meprop.kernels import native; from meprop import sparse_linear\n"
        "assert not native.available(); print(native.build_error())\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "sparse_linear(x, torch.randn(7, 5), None, k=2).sum().backward(); print(x.grad.shape)\n"
    )
    env = {**os.environ, "MEPROP_NATIVE": "0", "MEPROP_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "MEPROP_NATIVE=0" in out.stdout and "torch.Size([3, 5])" in out.stdout
    assert not any(tmp_path.iterdir())


@needs_native
def test_native_build_is_cached():
    lib = build._build(build.os.environ.get("CXX", "g++"))
    stamp = lib.stat().st_mtime_ns
    assert build._build(build.os.environ.get("CXX", "g++")) == lib
    assert lib.stat().st_mtime_ns == stamp


@needs_native
def test_native_build_falls_back_to_other_flags(tmp_path, monkeypatch):
    # A flag set that does not compile is recorded (and not retried); the next one is used.
    monkeypatch.setenv("MEPROP_CACHE", str(tmp_path))
    bad = ["-O3", "--no-such-flag-for-meprop", "-shared", "-fPIC"]
    good = build.flag_sets("native")[-1]
    monkeypatch.setattr(build, "flag_sets", lambda arch: [bad, good])
    lib = build._build(build.os.environ.get("CXX", "g++"))
    assert lib.exists() and len(list(tmp_path.glob("*.failed"))) == 1
    assert build._build(build.os.environ.get("CXX", "g++")) == lib


# --------------------------------------------------------------------------------------------
# Reused dense gradient buffers (pool.GradPool)


@pytest.fixture
def pooled(monkeypatch):
    """Every dense dW of the C++ kernels goes through the pool (normally from 4 MiB on)."""
    if not native.available():
        pytest.skip(str(native.build_error()))
    monkeypatch.setattr(checks, "BIG_BYTES", 0)
    monkeypatch.setattr(pool.POOL, "enabled", True)
    native.clear_grad_pool()
    yield pool.POOL
    native.clear_grad_pool()


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_pool_reuses_buffers_safely(pooled, mode):
    from meprop import sparse_linear
    from meprop.reference import reference_backward

    x, w = torch.randn(6, 9), torch.randn(40, 9, requires_grad=True)

    def step(g):  # one backward; returns the reference dW of that call
        sparse_linear(x, w, None, k=3, mode=mode, backend="native").backward(g)
        return reference_backward(x, w.detach(), g, 3, mode)[1]

    gs = [torch.randn(6, 40) for _ in range(5)]
    want = step(gs[0])
    torch.testing.assert_close(w.grad, want)
    kept = w.grad  # still referenced: its buffer must not be handed out again
    kept_copy = kept.clone()
    w.grad = None
    want = step(gs[1])
    torch.testing.assert_close(w.grad, want)
    assert w.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, kept_copy)
    del kept
    for g in gs[2:]:  # freed each time: reused, the old rows zeroed
        w.grad = None
        want = step(g)
        torch.testing.assert_close(w.grad, want)
    w.grad.add_(1.0)  # an in-place change (every row non-zero), then freed: zeroed in full
    w.grad = None
    want = step(gs[0])
    torch.testing.assert_close(w.grad, want)
    # Accumulation into an existing .grad: the new buffer is added, then free again.
    want2 = want + step(gs[1])
    torch.testing.assert_close(w.grad, want2)
    assert len(pooled._bufs[(40, 9, torch.float32, True)]) <= pooled.PER_SHAPE


def test_pool_is_bounded(pooled, monkeypatch):
    monkeypatch.setattr(pooled, "MAX_BUFFERS", 3)
    kept = [pooled.take(n, 4, torch.float32)[0] for n in (5, 6, 7, 8, 9) for _ in range(2)]
    assert sum(map(len, pooled._bufs.values())) <= 3
    assert (9, 4, torch.float32, True) in pooled._bufs  # the shape used last stays
    assert all(torch.equal(t, torch.zeros_like(t)) for t in kept)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_pool_row_sparse_values(pooled, mode):
    # The values of row-sparse gradients come from the pool too (written in full, not zeroed):
    # a gradient still held keeps its values while later steps reuse other buffers.
    from meprop import sparse_linear
    from meprop.reference import reference_backward

    x, w = torch.randn(6, 9), torch.randn(40, 9, requires_grad=True)
    held = []
    for step in range(5):
        g = torch.randn(6, 40)
        w.grad = None
        sparse_linear(x, w, None, k=3, mode=mode, sparse_grad=True, backend="native").backward(g)
        want = reference_backward(x, w.detach(), g, 3, mode)[1]
        torch.testing.assert_close(w.grad.to_dense(), want)
        if step < 2:
            held.append((w.grad, want))
    for grad, want in held:
        torch.testing.assert_close(grad.to_dense(), want)
