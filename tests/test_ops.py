"""sparse_linear against the obviously-right reference: mask the gradient, then dense backward."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from meprop.kernels import native
from meprop.ops import (
    kernels_available,
    select_columns,
    sparse_linear,
)
from meprop.reference import mask_gradient, reference_backward

FLOATS = [torch.float32, torch.float64]
HALVES = [torch.float16, torch.bfloat16]
BACKENDS = ["torch", "masked", "auto", "numba"] + (["native"] if native.available() else [])
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def distinct_grad(lead, n, dtype):
    """An output gradient whose selections are unambiguous in any dtype.

    Column j has magnitude perm[j] + 1 in every row (signs random), so the per-row top-k and the
    column sums rank the same distinct values, exactly representable even in bfloat16.
    """
    mags = (torch.randperm(n) + 1).to(torch.float64)
    signs = torch.randint(0, 2, (*lead, n)).to(torch.float64) * 2 - 1
    return (signs * mags).to(dtype)


def run(x, w, b, g, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    y = sparse_linear(x, w, b, **kw)
    y.backward(g)
    return y, x.grad, w.grad, None if b is None else b.grad


SHAPES = [((1,), 5, 3), ((7,), 13, 11), ((4, 3), 6, 9)]  # (leading dims, in, out)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("dtype", FLOATS + HALVES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,sparse_bias", [(True, False), (True, True), (False, False)])
def test_matches_reference(mode, dtype, backend, bias, sparse_bias):
    if backend in ("numba", "native") and dtype in HALVES:
        pytest.skip("the compiled kernels take float32/float64 (test_kernel_backend_rejects_half)")
    for (lead, d_in, n), k in itertools.product(SHAPES, [1, 2]):
        x = torch.randn(*lead, d_in, dtype=torch.float64).to(dtype)
        w = torch.randn(n, d_in, dtype=torch.float64).to(dtype)
        b = torch.randn(n, dtype=torch.float64).to(dtype) if bias else None
        g = distinct_grad(lead, n, dtype)
        y, dx, dw, db = run(x, w, b, g, k=k, mode=mode, sparse_bias=sparse_bias, backend=backend)
        torch.testing.assert_close(y, F.linear(x, w, b))
        rx, rw, rb = reference_backward(x.double(), w.double(), g.double(), k, mode, sparse_bias)
        tol = TOL[dtype]
        assert dx.dtype == dtype and dw.dtype == dtype
        torch.testing.assert_close(dx.double(), rx, **tol)
        torch.testing.assert_close(dw.double(), rw, **tol)
        if bias:
            torch.testing.assert_close(db.double(), rb, **tol)


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
@pytest.mark.parametrize("k", [1, 3])
def test_weight_grad_has_selected_rows_only(mode, k):
    # With x = I (M = in), dW^T = g~: the sparsified gradient itself is visible.
    m, n = 6, 10
    g = torch.randn(m, n, dtype=torch.float64)
    _, _, dw, _ = run(
        torch.eye(m, dtype=torch.float64), torch.randn(n, m).double(), None, g, k=k, mode=mode
    )
    gs = dw.t()
    nz = (gs != 0).sum(1)
    if mode == "unified":
        assert int((gs != 0).any(0).sum()) == k
        torch.testing.assert_close(gs, mask_gradient(g, k, "unified"))
    else:
        assert nz.tolist() == [k] * m
        assert torch.equal(gs[gs != 0], g[gs != 0])
    if mode == "per_example":
        torch.testing.assert_close(gs, mask_gradient(g, k, "per_example"))


def test_random_covers_every_index():
    m, n, k = 4, 12, 2
    seen = torch.zeros(n, dtype=torch.bool)
    for _ in range(60):
        _, _, dw, _ = run(
            torch.eye(m).double(),
            torch.randn(n, m).double(),
            None,
            torch.randn(m, n).double(),
            k=k,
            mode="random",
        )
        seen |= (dw != 0).any(1)
    assert seen.all()


def test_random_matches_reference_given_draw():
    # The draw is reproducible from the global seed, and the products are the reference's.
    x, w, g = torch.randn(5, 7).double(), torch.randn(9, 7).double(), torch.randn(5, 9).double()
    torch.manual_seed(3)
    _, dx, dw, _ = run(x, w, None, g, k=3, mode="random")
    torch.manual_seed(3)
    idx = torch.rand(g.shape).topk(3, dim=1, sorted=False).indices
    rx, rw, _ = reference_backward(x, w, g, 3, "random", selection=idx)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_k_at_least_n_is_exactly_dense(mode, lead):
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(*lead, 8, requires_grad=True)
    g = torch.randn(*lead, 6)
    lin(x).backward(g)
    ref = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = None
    lin.zero_grad()
    for k in (6, 100):
        x.grad = None
        lin.zero_grad()
        sparse_linear(x, lin.weight, lin.bias, k=k, mode=mode).backward(g)
        for a, b in zip(ref, (x.grad, lin.weight.grad, lin.bias.grad), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
def test_gradcheck_at_k_ge_n(mode):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    counts = torch.zeros(3, dtype=torch.int64)  # forces the custom Function, not F.linear
    assert torch.autograd.gradcheck(
        lambda x, w, b: sparse_linear(x, w, b, k=3, mode=mode, counts=counts), (x, w, b)
    )


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(mode, backend):
    x, w = torch.randn(3, 4), torch.randn(6, 4)
    g = torch.randn(3, 6) * 1e-3
    g[1, 4] = float("nan")
    g[2, 0] = float("inf")
    _, dx, dw, db = run(x, w, torch.zeros(6), g, k=1, mode=mode, backend=backend)
    assert torch.isnan(dx[1]).all()
    assert torch.isnan(dw[4]).all()
    if mode == "per_example":
        assert torch.isinf(dw[0]).all()
    assert torch.isnan(db[4])


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_non_contiguous_and_frozen_inputs(mode):
    base = torch.randn(9, 6, dtype=torch.float64)
    x = base.t()  # (6, 9), non-contiguous
    w = torch.randn(14, 9, dtype=torch.float64)[::2]  # (7, 9), non-contiguous
    g = torch.randn(7, 6, dtype=torch.float64).t()
    _, dx, dw, _ = run(x, w, None, g, k=2, mode=mode)
    rx, rw, _ = reference_backward(x, w, g, 2, mode)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)
    # requires_grad=False on either operand
    xf = x.detach().clone()
    wt = w.detach().clone().requires_grad_(True)
    sparse_linear(xf, wt, None, k=2, mode=mode).backward(g)
    torch.testing.assert_close(wt.grad, rw)
    xt = x.detach().clone().requires_grad_(True)
    sparse_linear(xt, w.detach(), None, k=2, mode=mode).backward(g)
    torch.testing.assert_close(xt.grad, rx)


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_equals_dense(mode, backend):
    x, w, g = torch.randn(5, 7), torch.randn(20, 7), torch.randn(5, 20)
    torch.manual_seed(1)
    _, dx, dw, _ = run(x, w, None, g, k=3, mode=mode, backend=backend)
    torch.manual_seed(1)
    _, sx, sw, _ = run(x, w, None, g, k=3, mode=mode, backend=backend, sparse_grad=True)
    assert sw.layout == torch.sparse_coo and not dw.is_sparse
    torch.testing.assert_close(sw.to_dense(), dw)
    torch.testing.assert_close(sx, dx)
    assert sw._nnz() == int((dw != 0).any(1).sum())


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_usage_record(mode):
    m, n, k = 5, 9, 2
    counts = torch.zeros(n, dtype=torch.int64)
    sel = torch.zeros(1, dtype=torch.int64)
    x = torch.randn(m, 4, requires_grad=True)
    g = torch.randn(m, n)
    for _ in range(2):
        sparse_linear(
            x, torch.randn(n, 4), None, k=k, mode=mode, counts=counts, selections=sel
        ).backward(g)
    assert int(sel) == 2 * m
    assert int(counts.sum()) == 2 * m * k
    if mode == "unified":
        assert set(counts.nonzero().flatten().tolist()) == set(select_columns(g, k).tolist())
    else:
        expect = torch.zeros(n, dtype=torch.int64)
        expect.index_add_(0, g.abs().topk(k, 1).indices.flatten(), torch.ones(m * k).long())
        assert torch.equal(counts, 2 * expect)


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_usage_record_skips_zero_gradients(mode, backend):
    # Units 0-2 have a zero gradient in every row (an inactive ReLU): kept by top-k as ties
    # fill the k slots, but never counted; with k >= n (dense path) likewise.
    m, n = 6, 8
    g = torch.randn(m, n)
    g[:, :3] = 0
    g[0, 5] = 0  # one zero among the others
    for k in (6, n):
        counts = torch.zeros(n, dtype=torch.int64)
        sel = torch.zeros(1, dtype=torch.int64)
        x = torch.randn(m, 4, requires_grad=True)
        w = torch.randn(n, 4)
        sparse_linear(
            x, w, None, k=k, mode=mode, counts=counts, selections=sel, backend=backend
        ).backward(g)
        assert int(sel) == m
        assert counts[:3].tolist() == [0, 0, 0]
        if k == n or mode != "random":  # all 5 non-zero columns fit in the top 6
            assert counts[3:].tolist() == [m, m, m - 1, m, m]


def test_empty_batch():
    x = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    for mode in ("per_example", "unified", "random"):
        sparse_linear(x, w, None, k=2, mode=mode).sum().backward()
        assert x.grad.shape == (0, 4) and torch.equal(w.grad, torch.zeros(6, 4))


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(k=0), ValueError, "k must be >= 1, got 0"),
        (dict(k=2.5), TypeError, "k must be int, got float 2.5"),
        (dict(k=True), TypeError, "k must be int, got bool"),
        (dict(k=2, mode="topk"), ValueError, "mode must be one of"),
        (dict(k=2, sparse_bias="yes"), TypeError, "sparse_bias must be bool"),
        (dict(k=2, backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        sparse_linear(torch.randn(2, 3), torch.randn(4, 3), None, **kw)


@pytest.mark.skipif(not kernels_available(torch.zeros(1)), reason="compiled kernels unavailable")
@pytest.mark.parametrize("backend", ["numba", "native"])
def test_kernel_backend_rejects_half(backend):
    x = torch.randn(2, 3, dtype=torch.float16, requires_grad=True)
    y = sparse_linear(x, torch.randn(4, 3, dtype=torch.float16), None, k=2, backend=backend)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' needs float32/float64"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", HALVES)
def test_half_column_scores_accumulate_in_float32(dtype):
    # Column sums rounded to 8 (bfloat16) or 11 (float16) bits tie or reorder columns; summed in
    # float32 they rank as the exact sums do.
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        g = torch.randn(64, 50, generator=gen).to(dtype)
        exact = g.double().abs().sum(0).topk(10).indices.sort().values
        assert torch.equal(select_columns(g, 10), exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_symmetric_matches_reference(backend, k):
    """symmetric: per row the k//2 largest positive and k - k//2 largest negative entries,
    through every backend, against the mask-then-dense reference; rows with fewer entries of
    one sign than asked (all positive, all zero) count no entry twice."""
    torch.manual_seed(k)
    x = torch.randn(6, 7, dtype=torch.float64)
    w = torch.randn(9, 7, dtype=torch.float64)
    g = torch.randn(6, 9, dtype=torch.float64)
    g[1] = g[1].abs()  # no negative entry
    g[2] = 0.0
    g[3, :7] = -g[3, :7].abs()  # two non-negative entries at most
    _, dx, dw, db = run(x, w, torch.zeros(9, dtype=torch.float64), g, k=k, mode="symmetric",
                        backend=backend)  # fmt: skip
    rx, rw, rb = reference_backward(x, w, g, k, "symmetric")
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)
    torch.testing.assert_close(db, rb)
    kept = mask_gradient(g, k, "symmetric")
    pos, neg = (kept > 0).sum(1), (kept < 0).sum(1)
    assert (pos <= k // 2).all() and (neg <= k - k // 2).all()
    assert neg[1] == 0 and kept[2].abs().sum() == 0
    full = (g[0] > 0).sum() >= k // 2 and (g[0] < 0).sum() >= k - k // 2
    assert not full or (pos[0], neg[0]) == (k // 2, k - k // 2)


def test_symmetric_usage_record_counts_each_kept_entry_once():
    g = torch.tensor([[3.0, 2.0, 1.0, 0.5], [-1.0, -2.0, 0.0, 0.0]])
    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    counts, sel = torch.zeros(4), torch.zeros(1)
    sparse_linear(x, w, None, 2, "symmetric", counts=counts, selections=sel).backward(g)
    # row 0: its largest positive (col 0), no negative; row 1: its largest negative (col 1)
    assert counts.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_layer_forward_skips_function_apply_signature_binding(monkeypatch):
    """Eager forward of a meProp layer calls the C++ apply directly: torch's Function.apply
    binds the arguments with ``inspect.signature`` on every call (about 90 us, more than a
    50 x 500 x 500 product), so a forward that still went through it would fail here. The
    gradients are those of Function.apply (the same Function, run the same way)."""
    import inspect

    import meprop
    from meprop.ops import _SparseLinearFn

    torch.manual_seed(0)
    layer = meprop.SparseLinear(12, 9, config=meprop.MePropConfig(k=3, mode="unified"))
    x = torch.randn(5, 12)
    cfg = layer.config
    y_ref = _SparseLinearFn.apply(x, layer.weight, layer.bias, cfg, None, None, None, None)
    (dw_ref,) = torch.autograd.grad(y_ref.square().sum(), layer.weight)

    def no_binding(*a, **k):
        raise AssertionError("inspect.signature called in a layer's forward")

    monkeypatch.setattr(inspect, "signature", no_binding)
    y = layer(x)
    (dw,) = torch.autograd.grad(y.square().sum(), layer.weight)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_ref, rtol=0, atol=0)
