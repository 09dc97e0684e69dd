"""meprop.LazyAdam against the obviously-right references: torch.optim.Adam for dense
gradients, and Adam's formula applied to the gradient's rows only (the rest untouched) for
row-sparse ones; every path (C++ kernel, PyTorch ops, torch's fused kernel)."""

import copy
import math

import pytest
import torch

import meprop.optim as optim
from meprop import LazyAdam, MePropConfig, SparseLinear
from meprop.kernels import native

PATHS = ["native", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "native" and not native.available():
        pytest.skip("meprop's C++ kernels do not build here")
    if request.param == "torch":
        monkeypatch.setattr(optim, "_NATIVE", [False])
        monkeypatch.setattr(optim, "_FUSED", False)  # dense gradients through the row update too
    return request.param


def _reference(p, m, v, rows, g, step, lr, betas, eps, wd):
    """Adam (torch.optim.Adam's formula) on rows ``rows`` of float64 copies, the rest kept."""
    b1, b2 = betas
    p, m, v = p.clone(), m.clone(), v.clone()
    for i, r in enumerate(rows.tolist()):
        gr = g[i] + wd * p[r]
        m[r] = b1 * m[r] + (1 - b1) * gr
        v[r] = b2 * v[r] + (1 - b2) * gr * gr
        denom = v[r].sqrt() / math.sqrt(1 - b2**step) + eps
        p[r] = p[r] - lr / (1 - b1**step) * m[r] / denom
    return p, m, v


def _step_alike(ours, theirs, opt, ref, steps):
    """``steps`` steps of both optimizers, each with the same random dense gradients."""
    for _ in range(steps):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()


def _row_sparse(rows, vals, shape):
    return torch.sparse_coo_tensor(rows[None], vals, shape, check_invariants=True).coalesce()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_row_sparse_gradients_update_their_rows_only(path, dtype, wd):
    torch.manual_seed(0)
    n, d, lr, betas, eps = 40, 24, 1e-2, (0.9, 0.999), 1e-8
    p = torch.nn.Parameter(torch.randn(n, d, dtype=dtype))
    opt = LazyAdam([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    ref_p = p.detach().double().clone()
    ref_m, ref_v = torch.zeros_like(ref_p), torch.zeros_like(ref_p)
    for step in range(1, 6):
        rows = torch.randperm(n)[:7].sort().values
        vals = torch.randn(7, d, dtype=dtype)
        p.grad = _row_sparse(rows, vals, (n, d))
        before = p.detach().clone()
        opt.step()
        ref_p, ref_m, ref_v = _reference(
            ref_p, ref_m, ref_v, rows, vals.double(), step, lr, betas, eps, wd
        )
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(p.detach().double(), ref_p, rtol=tol, atol=tol)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref_m, rtol=tol, atol=tol)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), ref_v, rtol=tol, atol=tol)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(p.detach()[untouched], before[untouched])  # bit for bit
    assert opt.state[p]["step"] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_gradients_are_torch_adam(path, dtype):
    torch.manual_seed(1)
    shapes = [(30, 20), (20,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(q.detach().clone()) for q in ours]
    kw = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01}
    opt, ref = LazyAdam(ours, **kw), torch.optim.Adam(theirs, **kw)
    _step_alike(ours, theirs, opt, ref, steps=4)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_dense_gradients_match_torchs_fused_adam_exactly():
    torch.manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))]
    theirs = [torch.nn.Parameter(q.detach().clone()) for q in ours]
    opt, ref = LazyAdam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2, fused=True)
    _step_alike(ours, theirs, opt, ref, steps=3)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_uncoalesced_gradients_sum_their_repeated_rows(path):
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(10, 4))
    q = torch.nn.Parameter(p.detach().clone())
    rows = torch.tensor([[1, 5, 1, 7]])
    vals = torch.randn(4, 4)
    p.grad = torch.sparse_coo_tensor(rows, vals, (10, 4), check_invariants=True)  # row 1 twice
    assert not p.grad.is_coalesced()
    q.grad = p.grad.coalesce()
    a, b = LazyAdam([p], lr=0.1), LazyAdam([q], lr=0.1)
    a.step()
    b.step()
    torch.testing.assert_close(p, q)


def test_unsorted_rows_are_sorted_first_and_the_row_kernel_refuses_them_untouched():
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(10, 4))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[5, 1, 7]]), torch.randn(3, 4), (10, 4), check_invariants=True
    )
    q.grad = p.grad.coalesce()
    LazyAdam([p], lr=0.1).step()
    LazyAdam([q], lr=0.1).step()
    torch.testing.assert_close(p, q)
    if not native.available():
        return
    w, m, v = torch.randn(10, 4), torch.zeros(10, 4), torch.zeros(10, 4)
    before = w.clone()
    for rows in ([5, 1], [1, 1], [3, 10], [-1, 2]):  # unsorted, repeated, out of range
        ok = native.row_adam(w, m, v, torch.tensor(rows), torch.ones(2, 4), 4, 0.1,
                             (0.9, 0.999), 1e-8, 0.0, 1)  # fmt: skip
        assert not ok and torch.equal(w, before) and not m.any() and not v.any()
    assert native.row_adam(w, m, v, torch.tensor([1, 5]), torch.ones(2, 4), 4, 0.1,
                           (0.9, 0.999), 1e-8, 0.0, 1)  # fmt: skip
    assert int((w != before).any(1).sum()) == 2


def test_strided_parameters_and_other_dtypes_take_the_torch_path():
    torch.manual_seed(4)
    base = torch.randn(6, 9)
    p = torch.nn.Parameter(base.t())  # not contiguous
    q = torch.nn.Parameter(base.t().contiguous())
    g = torch.randn(9, 6)
    p.grad, q.grad = g.clone(), g.clone()
    LazyAdam([p], lr=0.1).step()
    torch.optim.Adam([q], lr=0.1).step()
    torch.testing.assert_close(p, q)
    h = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.bfloat16))
    h.grad = _row_sparse(torch.tensor([0, 2]), torch.randn(2, 3, dtype=torch.bfloat16), (5, 3))
    before = h.detach().clone()
    LazyAdam([h], lr=0.1).step()
    assert torch.equal(h[1], before[1]) and not torch.equal(h[0], before[0])


def test_sparse_layer_moves_only_its_kept_rows_and_dense_k_is_adam():
    torch.manual_seed(5)
    x = torch.randn(16, 12)
    layer = SparseLinear(12, 10, config=MePropConfig(k=3, mode="unified", sparse_grad=True))
    opt = LazyAdam(layer.parameters(), lr=1e-2)
    before = layer.weight.detach().clone()
    layer(x).pow(2).sum().backward()
    kept = layer.weight.grad.coalesce()._indices()[0]
    opt.step()
    moved = (layer.weight != before).any(dim=1).nonzero().flatten()
    assert torch.equal(moved, kept) and len(kept) == 3
    # k >= n: every row has a gradient every step, so LazyAdam is Adam
    full = SparseLinear(12, 10, config=MePropConfig(k=10, mode="unified", sparse_grad=True))
    dense = torch.nn.Linear(12, 10)
    dense.load_state_dict(full.state_dict())
    a, b = LazyAdam(full.parameters(), lr=1e-2), torch.optim.Adam(dense.parameters(), lr=1e-2)
    for _ in range(3):
        for model, opt_ in ((full, a), (dense, b)):
            opt_.zero_grad()
            model(x).pow(2).sum().backward()
            opt_.step()
    torch.testing.assert_close(full.weight, dense.weight, rtol=2e-6, atol=2e-6)


def test_state_dict_round_trip_continues_the_same_updates():
    torch.manual_seed(6)
    p = torch.nn.Parameter(torch.randn(8, 3))
    opt = LazyAdam([p], lr=0.05)
    grads = [_row_sparse(torch.tensor([1, 4]), torch.randn(2, 3), (8, 3)) for _ in range(4)]
    for g in grads[:2]:
        p.grad = g
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = LazyAdam([q], lr=0.05)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # (as torch.save/load would)
    for g in grads[2:]:
        p.grad, q.grad = g, g.clone()
        opt.step()
        other.step()
    assert torch.equal(p, q) and other.state[q]["step"] == 4


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"lr": -1.0}, "lr must be a number >= 0, got -1.0"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    ],
)
def test_bad_settings_are_refused_by_name(kw, words):
    with pytest.raises(ValueError) as e:
        LazyAdam([torch.nn.Parameter(torch.zeros(2))], **kw)
    assert words in str(e.value)


def test_a_gradient_sparse_over_two_dimensions_is_refused():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[0, 1], [2, 3]]), torch.ones(2), (4, 4), check_invariants=True
    )
    with pytest.raises(ValueError, match="sparse over its first dimension only .* sparse_dim=2"):
        LazyAdam([p]).step()


def test_closure_loss_is_returned():
    p = torch.nn.Parameter(torch.ones(3))

    def closure():
        p.grad = None
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert LazyAdam([p]).step(closure).item() == 3.0


def test_lstm_and_conv_row_sparse_gradients(path):
    """SparseLSTM's gate weights and SparseConv2d's filters (row-sparse over their first
    dimension with sparse_grad=True): only the rows with a gradient move, by Adam's rule."""
    from meprop import SparseConv2d, SparseLSTM

    torch.manual_seed(7)
    conv = SparseConv2d(3, 6, 3, config=MePropConfig(k=2, mode="unified", sparse_grad=True))
    lstm = SparseLSTM(5, 4, config=MePropConfig(k=3, mode="unified", sparse_grad=True))
    for module, run in (
        (conv, lambda: conv(torch.randn(2, 3, 5, 5)).pow(2).sum()),
        (lstm, lambda: lstm(torch.randn(3, 2, 5))[0].pow(2).sum()),
    ):
        weights = [p for p in module.parameters() if p.dim() > 1]
        before = [w.detach().clone() for w in weights]
        opt = LazyAdam(module.parameters(), lr=0.1)
        run().backward()
        kept = [w.grad.coalesce()._indices()[0] for w in weights]
        opt.step()
        for w, b, rows in zip(weights, before, kept, strict=True):
            moved = (w != b).flatten(1).any(1)
            assert not moved[~torch.isin(torch.arange(len(w)), rows)].any()  # the rest: kept
            nonzero = rows[w.grad.coalesce()._values().flatten(1).ne(0).any(1)]
            assert moved[nonzero].all() and len(nonzero)
            # Adam's first step moves each entry with a gradient by lr (sign of the gradient)
            step = (w - b)[rows]
            g = w.grad.coalesce()._values()
            torch.testing.assert_close(step, -0.1 * torch.sign(g) * (g != 0), atol=1e-4, rtol=0)


def test_dense_gradients_of_several_dtypes_in_one_group():
    torch.manual_seed(8)
    ours = [
        torch.nn.Parameter(torch.randn(4, 3)),
        torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
    ]
    theirs = [torch.nn.Parameter(q.detach().clone()) for q in ours]
    opt, ref = LazyAdam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    _step_alike(ours, theirs, opt, ref, steps=3)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
