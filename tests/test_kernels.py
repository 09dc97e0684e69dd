"""The compiled CPU kernels (meprop.kernels.cpu) against plain PyTorch references.

Each op runs both as its serial and its parallel numba build (the ``path`` fixture), through
the eager function and through ``torch.ops.meprop``. References: ``g.abs().topk`` for the
selection (NaN ranks highest in torch too), and the dense products of the scattered g~.
"""

import itertools

import pytest
import torch

cpu = pytest.importorskip("meprop.kernels.cpu")
if not cpu.available():  # pragma: no cover - numba missing or broken
    pytest.skip("numba kernels unavailable", allow_module_level=True)

FLOATS = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
MS = [0, 1, 7, 64]
NS = [1, 5, 500]
INS = [1, 3, 300]


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Run the serial build (1 thread) or force the parallel one whatever the size."""
    before = torch.get_num_threads()
    if request.param == "serial":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(2)
        monkeypatch.setattr(cpu, "_PAR_MIN_NS", 0)
    yield request.param
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
def test_topk_rows_shapes(path, dtype):
    for m, n in itertools.product(MS, NS):
        g = torch.randn(m, n, dtype=dtype)
        for k in ks(n):
            check_topk(g, k, *cpu.topk_rows(g, k))
            check_topk(g, k, *torch.ops.meprop.topk_rows(g, k))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "kind", ["ties", "zeros", "relu", "nan", "inf", "nan_inf", "wide_range", "tiny", "sorted"]
)
def test_topk_rows_values(path, dtype, kind):
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
        idx, vals = cpu.topk_rows(g, k)
        check_topk(g, k, idx, vals)
        # NaNs are always selected, as many as fit.
        nans = torch.isnan(g).sum(1).clamp(max=k)
        assert torch.equal(torch.isnan(vals).sum(1), nans)


@pytest.mark.parametrize("k", [1, 3, 40, 100, 150])
def test_topk_rows_ties_prefer_lower_columns(path, k):
    # All magnitudes equal (signs differ): the documented choice is the first k columns.
    g = torch.ones(5, 150, dtype=torch.float64)
    g[:, 1::2] = -1
    idx, vals = cpu.topk_rows(g, k)
    assert torch.equal(idx.sort(dim=1).values, torch.arange(k).expand(5, k))
    torch.testing.assert_close(vals, g.gather(1, idx), rtol=0, atol=0)


def test_topk_rows_noncontiguous_and_requires_grad():
    g = torch.randn(300, 40, dtype=torch.float64).t()  # (40, 300), not contiguous
    check_topk(g, 7, *cpu.topk_rows(g, 7))
    g = torch.randn(5, 30, requires_grad=True)
    check_topk(g.detach(), 4, *cpu.topk_rows(g, 4))


def test_topk_rows_bad_k():
    g = torch.randn(3, 5)
    for k in (0, -1, 6):
        with pytest.raises(ValueError, match=f"k={k}"):
            cpu.topk_rows(g, k)
        with pytest.raises(ValueError, match=f"k={k}"):
            torch.ops.meprop.topk_rows(g, k)


def test_topk_rows_bad_inputs():
    with pytest.raises(TypeError, match="float32/float64"):
        cpu.topk_rows(torch.randn(3, 5).half(), 2)
    with pytest.raises(TypeError, match="float32/float64"):
        cpu.topk_rows(torch.ones(3, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="g must be"):
        cpu.topk_rows(torch.randn(5), 2)


# --------------------------------------------------------------------------------------------
# rows_matmul, rows_outer, rows_outer_dense


def products_case(m, n, d, k, dtype, dup):
    """(idx, vals, weight, x): idx from topk_rows, or with heavy duplication (``dup``): every
    row picks among the same few columns, repeats within a row included."""
    if dup:
        idx = torch.randint(0, min(n, 3), (m, k))
    else:
        idx = cpu.topk_rows(torch.randn(m, n, dtype=dtype), k)[0]
    vals = torch.randn(m, k, dtype=dtype)
    return idx, vals, torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)


def check_products(idx, vals, weight, x, n):
    g = dense_g(idx, vals, n)
    tol = TOL[vals.dtype]
    for matmul in (cpu.rows_matmul, torch.ops.meprop.rows_matmul):
        dx = matmul(idx, vals, weight)
        assert dx.shape == (idx.shape[0], weight.shape[1]) and dx.dtype == vals.dtype
        torch.testing.assert_close(dx, g @ weight, **tol)
    dw = g.t() @ x
    for outer in (cpu.rows_outer, torch.ops.meprop.rows_outer):
        rows, dw_rows = outer(idx, vals, x, n)
        assert rows.dtype == torch.int64 and dw_rows.dtype == vals.dtype
        assert torch.equal(rows, idx.flatten().unique())  # sorted, distinct
        assert dw_rows.shape == (rows.shape[0], x.shape[1])
        torch.testing.assert_close(dw_rows, dw[rows], **tol)
    for dense in (cpu.rows_outer_dense, torch.ops.meprop.rows_outer_dense):
        torch.testing.assert_close(dense(idx, vals, x, n), dw, **tol)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dup", [False, True], ids=["topk", "duplicates"])
def test_products_shapes(path, dtype, dup):
    for m, n, d in itertools.product(MS, NS, INS):
        for k in ks(n):
            # The forced-parallel runs skip some middle shapes: on a busy machine every tiny
            # parallel launch can wait milliseconds for a descheduled thread.
            if path == "parallel" and (m == 7 or n == 1 or d == 1 or 1 < k < n):
                continue
            check_products(*products_case(m, n, d, k, dtype, dup), n)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_products_wide(path, dtype, big, monkeypatch):
    # Wider than a column block, few rows: the blocked task split (and its remainder block).
    # big: rows_outer takes its path for large outputs (allocated by numpy, two calls).
    if big:
        monkeypatch.setattr(cpu, "_BIG_OUTPUT", 0)
    for m, k in [(0, 3), (1, 5), (3, 17), (40, 8)]:
        check_products(*products_case(m, 600, 1111, k, dtype, False), 600)
    for dup in (False, True):
        check_products(*products_case(7, 5, 3, 2, dtype, dup), 5)


def test_products_k_zero_and_n_zero():
    idx = torch.empty(4, 0, dtype=torch.int64)
    vals = torch.empty(4, 0)
    assert torch.equal(cpu.rows_matmul(idx, vals, torch.randn(6, 3)), torch.zeros(4, 3))
    rows, dw_rows = cpu.rows_outer(idx, vals, torch.randn(4, 3), 6)
    assert rows.shape == (0,) and dw_rows.shape == (0, 3)
    assert torch.equal(cpu.rows_outer_dense(idx, vals, torch.randn(4, 3), 6), torch.zeros(6, 3))
    assert cpu.rows_outer_dense(idx, vals, torch.randn(4, 3), 0).shape == (0, 3)


def test_products_noncontiguous():
    idx = cpu.topk_rows(torch.randn(6, 20), 4)[0]
    vals = torch.randn(4, 6).t()
    weight = torch.randn(9, 20).t()  # (20, 9)
    x = torch.randn(9, 6).t()  # (6, 9)
    check_products(idx, vals, weight, x, 20)


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
def test_products_bad_indices(path, big, monkeypatch):
    if big:
        monkeypatch.setattr(cpu, "_BIG_OUTPUT", 0)
    idx = torch.tensor([[0, 5], [1, 2]])
    vals = torch.randn(2, 2)
    with pytest.raises(IndexError, match="1 value"):
        cpu.rows_matmul(idx, vals, torch.randn(5, 3))
    with pytest.raises(IndexError, match="1 value"):
        cpu.rows_outer(idx, vals, torch.randn(2, 3), 5)
    with pytest.raises(IndexError, match="3 value"):  # -5, -1, -2
        cpu.rows_outer_dense(-idx, vals, torch.randn(2, 3), 5)
    with pytest.raises(IndexError, match="outside"):
        torch.ops.meprop.rows_matmul(idx, vals, torch.randn(5, 3))
    # A bad index inside a group of four (the kernels' unrolled step) is found too.
    idx = torch.tensor([[0, 1, 9, 2, 3, 4], [4, 3, 2, 1, 0, 1]])
    vals = torch.randn(2, 6)
    with pytest.raises(IndexError, match="1 value"):
        cpu.rows_matmul(idx, vals, torch.randn(5, 3))
    with pytest.raises(IndexError, match="1 value"):
        cpu.rows_outer(idx, vals, torch.randn(2, 3), 5)


def test_products_bad_inputs():
    idx, vals = torch.tensor([[0, 1]]), torch.randn(1, 2)
    with pytest.raises(TypeError, match="int64"):
        cpu.rows_matmul(idx.int(), vals, torch.randn(5, 3))
    with pytest.raises(ValueError, match="dtype of vals"):
        cpu.rows_matmul(idx, vals, torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="M=1 rows"):
        cpu.rows_outer(idx, vals, torch.randn(2, 3), 5)
    with pytest.raises(ValueError, match=r"\(M, k\)"):
        cpu.rows_outer(idx, vals[:, :1], torch.randn(1, 3), 5)


# --------------------------------------------------------------------------------------------
# Registration, helpers, threads


def test_opcheck():
    g = torch.randn(4, 9, dtype=torch.float64)
    idx, vals = cpu.topk_rows(g, 3)
    w, x = torch.randn(9, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.meprop.topk_rows.default, (g, 3))
    torch.library.opcheck(torch.ops.meprop.rows_matmul.default, (idx, vals, w))
    torch.library.opcheck(torch.ops.meprop.rows_outer.default, (idx, vals, x, 9))
    torch.library.opcheck(torch.ops.meprop.rows_outer_dense.default, (idx, vals, x, 9))


def test_available_supports():
    assert cpu.available()
    assert cpu.supports(torch.randn(2))
    assert cpu.supports(torch.randn(2, dtype=torch.float64))
    assert not cpu.supports(torch.randn(2).half())
    assert not cpu.supports(torch.randn(2).to_sparse())
    assert not cpu.supports(torch.ones(2, dtype=torch.int64))


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
