"""Higher-order gradients and torch.func transforms over meProp layers.

The reference is the obviously-right one: the layer's output gradient masked to the selection
(``meprop.reference.mask_topk_grad``), then autograd's own (differentiable) linear backward.
At k >= n everything equals ``nn.Linear``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meprop import AdaptiveK, MePropConfig, SparseLinear, SparseLSTM, sparsify_
from meprop.ops import _SparseLinearFn, apply_config
from meprop.reference import mask_topk_grad

pytestmark = pytest.mark.usefixtures("one_thread")

PER_ROW = ["per_example", "unified", "symmetric"]  # deterministic selections


def _masked_linear(x, w, b, k, mode, sparse_bias=False):
    """The reference: F.linear whose output gradient is masked to its top-k (bias from the full
    gradient unless sparse_bias), differentiable twice."""
    if sparse_bias:
        return mask_topk_grad(F.linear(x, w, b), k, mode)
    return mask_topk_grad(F.linear(x, w), k, mode) + b


def _penalty(out, inputs):
    """A gradient penalty: the squared norm of the first-order gradients, kept in the graph."""
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    return sum(g.square().sum() for g in grads)


@pytest.mark.parametrize("mode", PER_ROW)
@pytest.mark.parametrize("sparse_bias", [False, True])
def test_gradgradcheck_masked_reference(mode, sparse_bias):
    cfg = MePropConfig(k=2, mode=mode, sparse_bias=sparse_bias)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *t: apply_config(*t, cfg), (x, w, b))
    # second order against the reference
    got = torch.autograd.grad(_penalty(apply_config(x, w, b, cfg), (x, w, b)), (x, w, b))
    ref = _penalty(_masked_linear(x, w, b, 2, mode, sparse_bias), (x, w, b))
    want = torch.autograd.grad(ref, (x, w, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_gradgradcheck_exact_at_k_ge_n():
    """The Function itself (usage record attached: no F.linear short cut) at k >= n is
    nn.Linear, to first and second order."""
    cfg = MePropConfig(k=5)
    counts, sel = torch.zeros(5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return _SparseLinearFn.apply(x, w, b, cfg, counts, sel, None)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    got = torch.autograd.grad(_penalty(fn(x, w, b), (x, w)), (x, w, b), allow_unused=True)
    want = torch.autograd.grad(_penalty(F.linear(x, w, b), (x, w)), (x, w, b), allow_unused=True)
    for a, e in zip(got, want, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_create_graph_gradients_stay_in_the_graph():
    """The issue's case: first-order gradients of a meProp layer requested with
    create_graph=True carry a graph (a penalty on them reaches the weights)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    sparsify_(model, MePropConfig(k=4))
    x = torch.randn(10, 8)
    params = list(model.parameters())
    grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
    assert all(g.requires_grad for g in grads)
    sum(g.square().sum() for g in grads).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_create_graph_refusals_name_the_case():
    x = torch.randn(4, 6)
    layer = SparseLinear(6, 5, config=MePropConfig(k=2, sparse_grad=True))
    with pytest.raises(RuntimeError, match=r"sparse_grad=True cannot run with create_graph=True"):
        torch.autograd.grad(layer(x).sum(), layer.weight, create_graph=True)
    lstm = SparseLSTM(3, 4, config=MePropConfig(k=2))
    out, _ = lstm(torch.randn(5, 2, 3))
    with pytest.raises(RuntimeError, match=r"SparseLSTM\(k=2.*create_graph=True"):
        torch.autograd.grad(out.sum(), lstm.weight_hh_l0, create_graph=True)


def test_create_graph_with_adaptive_k_matches_masked_reference():
    """Adaptive k under create_graph: the selection it made, masked, differentiated twice."""
    cfg = MePropConfig(k=4, adapt=AdaptiveK(min_k=1, rule="mass", share=0.5))
    layer = SparseLinear(6, 8, config=cfg).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    out = layer(x)
    (gw,) = torch.autograd.grad(out.square().sum(), layer.weight, create_graph=True)
    assert gw.requires_grad and 1 <= layer.last_k <= 4
    eager = copy.deepcopy(layer)
    eager(x).square().sum().backward()
    torch.testing.assert_close(gw.detach(), eager.weight.grad, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# torch.func


def _mlp(mode="per_example", k=3, **kw):
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    return sparsify_(model, MePropConfig(k=k, mode=mode, **kw))


def _loss(model):
    def loss(params, x):
        return torch.func.functional_call(model, params, (x,)).square().sum()

    return loss


@pytest.mark.parametrize("mode", PER_ROW)
def test_func_grad_matches_backward(mode):
    model = _mlp(mode)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(7, 6)
    got = torch.func.grad(_loss(model))(params, x)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


@pytest.mark.parametrize("mode", PER_ROW)
def test_vmap_of_grad_is_per_example_backward(mode):
    """Per-example gradients: vmap(grad) over examples equals one backward per example."""
    model = _mlp(mode)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(5, 1, 6)
    got = torch.func.vmap(torch.func.grad(_loss(model)), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i]).square().sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, msg=f"{name}[{i}]")


def test_vmap_forward_and_jacrev_match_autograd():
    model = _mlp("per_example")
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(model)(x), model(x))
    jac = torch.func.jacrev(model)(x)  # (3, 4, 3, 6): one vjp per output entry
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    for i in range(3):
        for j in range(4):
            (row,) = torch.autograd.grad(out[i, j], xr, retain_graph=True)
            torch.testing.assert_close(jac[i, j], row, msg=f"d out[{i},{j}] / dx")


def test_func_refusals_name_the_transform():
    x = torch.randn(4, 6)
    for cfg, match in [
        (dict(sparse_grad=True), r"sparse_grad=True cannot run under a torch.func transform"),
        (dict(adapt=AdaptiveK(min_k=1)), r"adaptive k .* under a torch.func transform"),
    ]:
        model = _mlp(**cfg)
        params = {n: p.detach() for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match=match):
            torch.func.grad(_loss(model))(params, x)
    lstm = SparseLSTM(6, 4, config=MePropConfig(k=2))
    with pytest.raises(RuntimeError, match=r"SparseLSTM does not run under torch.func"):
        torch.func.vmap(lstm, in_dims=1, out_dims=1)(torch.randn(3, 2, 6))
