"""Memorized sparse back-propagation (MePropConfig.memory) and dense warm-up steps
(MePropConfig.warmup), against the obviously-right references."""

import pytest
import torch
from torch import nn

from meprop import MePropConfig, SparseLinear, densify_, sparsify_
from meprop.adaptive import KRecord
from meprop.config import AdaptiveK
from meprop.kernels import native
from meprop.lstm import SparseLSTM
from meprop.ops import sparse_linear
from meprop.reference import reference_backward, reference_memory_backward

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "masked", "auto", "numba"] + (["native"] if native.available() else [])
MODES = ["per_example", "unified", "symmetric"]


def steps(layer, n_steps, lead=(7,), dtype=torch.float64):
    """Run ``n_steps`` forward/backward calls on random data; yield (x, g, grads) each time."""
    for _ in range(n_steps):
        x = torch.randn(*lead, layer.in_features, dtype=dtype, requires_grad=True)
        g = torch.randn(*lead, layer.out_features, dtype=dtype)
        layer(x).backward(g)
        grads = (x.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
        layer.weight.grad = layer.bias.grad = None
        yield x.detach(), g, grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse_bias", [False, True])
def test_memory_matches_reference(mode, backend, sparse_bias):
    if backend == "numba" and mode != "per_example":
        pytest.skip("numba runs per_example only")
    cfg = MePropConfig(k=4, mode=mode, memory=0.8, backend=backend, sparse_bias=sparse_bias)
    layer = SparseLinear(13, 11, config=cfg).double()
    memory = torch.zeros(11, dtype=torch.float64)
    for lead in [(7,), (3, 2), (1,)]:  # leading dimensions flatten to rows
        for x, g, (dx, dw, db) in steps(layer, 2, lead):
            rdx, rdw, rdb, memory = reference_memory_backward(
                x, layer.weight.detach(), g, 4, mode, memory, 0.8, sparse_bias=sparse_bias
            )
            torch.testing.assert_close(dx, rdx)
            torch.testing.assert_close(dw, rdw)
            torch.testing.assert_close(db, rdb)
            torch.testing.assert_close(layer.k_record.memory, memory)


def test_memory_changes_what_is_selected():
    """A column that top-k keeps dropping gets through once its carried share grows: with
    memory the union of the selections covers more columns than without."""
    torch.manual_seed(1)
    n, k = 40, 2
    scale = torch.linspace(1.0, 1.2, n, dtype=torch.float64)  # columns nearly tied
    seen = {}
    for memory in (0.0, 0.9):
        layer = SparseLinear(5, n, config=MePropConfig(k=k, mode="unified", memory=memory))
        layer = layer.double()
        hit = torch.zeros(n, dtype=torch.bool)
        torch.manual_seed(2)
        for _ in range(30):
            x = torch.randn(4, 5, dtype=torch.float64)
            layer(x).backward(scale.expand(4, n).clone())
            hit |= layer.weight.grad.ne(0).any(1)
            layer.weight.grad = None
        seen[memory] = int(hit.sum())
    assert seen[0.0] == k  # the same k columns every step
    assert seen[0.9] > 4 * k


def test_memory_zero_is_plain_meprop():
    torch.manual_seed(3)
    x, g = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(8, 9, dtype=torch.float64, requires_grad=True)
    sparse_linear(x, w, None, k=3, memory=0.0).backward(g)
    _, rdw, _ = reference_backward(x, w.detach(), g, 3, "per_example")
    torch.testing.assert_close(w.grad, rdw)


def test_memory_functional_needs_record():
    x, w = torch.randn(2, 5), torch.randn(6, 5, requires_grad=True)
    with pytest.raises(ValueError, match="record=meprop.adaptive.KRecord"):
        sparse_linear(x, w, None, k=2, memory=0.5)
    record = KRecord()
    sparse_linear(x, w, None, k=2, memory=0.5, record=record).sum().backward()
    assert record.memory is not None and record.memory.shape == (6,)


def test_memory_restarts_at_a_new_width():
    """A memory kept for another width (meSimp shrank the layer) is not added: the call runs
    as the first one would, and keeps a memory of the new width."""
    layer = SparseLinear(5, 8, config=MePropConfig(k=2, memory=0.5)).double()
    layer.k_record.memory = torch.ones(12, dtype=torch.float64)  # a wider layer's
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 8, dtype=torch.float64)
    layer(x).backward(g)
    _, rdw, _ = reference_backward(x.detach(), layer.weight.detach(), g, 2, "per_example")
    torch.testing.assert_close(layer.weight.grad, rdw)
    assert layer.k_record.memory.shape == (8,)


def test_memory_with_adaptive_k_and_random_runs():
    for cfg in (
        MePropConfig(k=6, memory=0.8, adapt=AdaptiveK(min_k=1, rule="mass", share=0.5)),
        MePropConfig(k=6, mode="unified", memory=0.8, adapt=AdaptiveK(min_k=2)),
        MePropConfig(k=3, mode="random", memory=0.8),
    ):
        layer = SparseLinear(5, 10, config=cfg)
        for _ in steps(layer, 3, dtype=torch.float32):
            pass
        assert layer.k_record.memory is not None and layer.k_record.memory.shape == (10,)
        assert torch.isfinite(layer.k_record.memory).all()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(memory=1.0), r"memory must be in \[0, 1\)"),
        (dict(memory=-0.1), r"memory must be in \[0, 1\)"),
        (dict(memory=True), "memory must be a number"),
        (dict(warmup=-1), "warmup must be >= 0"),
        (dict(warmup=1.5), "warmup must be int"),
    ],
)
def test_bad_memory_and_warmup(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MePropConfig(k=2, **kw)


def test_repr_names_memory_and_warmup():
    layer = SparseLinear(4, 6, config=MePropConfig(k=2, memory=0.8, warmup=100))
    assert "memory=0.8, warmup=100" in repr(layer)


# --------------------------------------------------------------------------------------------
# warm-up


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_warmup_runs_dense_then_topk(mode):
    cfg = MePropConfig(k=2, mode=mode, warmup=3)
    layer = SparseLinear(6, 9, config=cfg).double()
    dense = nn.Linear(6, 9).double()
    dense.load_state_dict(layer.state_dict())
    with torch.no_grad():  # evaluations do not count as warm-up steps
        layer(torch.randn(4, 6, dtype=torch.float64))
    for i, (x, g, (dx, dw, _)) in enumerate(steps(layer, 5)):
        if i < 3:
            xd = x.clone().requires_grad_(True)
            dense(xd).backward(g)
            torch.testing.assert_close(dx, xd.grad)
            torch.testing.assert_close(dw, dense.weight.grad)
            dense.weight.grad = dense.bias.grad = None
            assert layer.last_k == 9
        else:
            _, rdw, _ = reference_backward(x, layer.weight.detach(), g, 2, mode)
            torch.testing.assert_close(dw, rdw)
            assert layer.last_k == 2
    assert layer.k_record.calls == 3


def test_warmup_counts_per_layer_after_sparsify():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    sparsify_(model, MePropConfig(k=2, warmup=2))
    for _ in range(3):
        model(torch.randn(4, 5)).sum().backward()
    assert [m.k_record.calls for m in (model[0], model[2])] == [2, 2]
    densify_(model)
    assert type(model[0]) is nn.Linear


def test_lstm_warmup_and_memory():
    lstm = SparseLSTM(4, 6, config=MePropConfig(k=2, warmup=1)).double()
    dense = nn.LSTM(4, 6).double()
    dense.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lstm(x)[0].sum().backward()
    dense(x)[0].sum().backward()
    torch.testing.assert_close(lstm.weight_hh_l0.grad, dense.weight_hh_l0.grad)
    assert lstm.k_record.calls == 1
    lstm(x)[0].sum().backward()  # top-k from here on: runs
    with pytest.raises(ValueError, match="SparseLSTM does not support MePropConfig\\(memory"):
        SparseLSTM(4, 6, config=MePropConfig(k=2, memory=0.5))(x)


def test_memory_under_compile_runs_eagerly_or_says_why():
    torch.manual_seed(4)
    eager = SparseLinear(8, 6, config=MePropConfig(k=2, memory=0.5)).double()
    layer = SparseLinear(8, 6, config=MePropConfig(k=2, memory=0.5)).double()
    layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(layer)
    for _ in range(2):
        x = torch.randn(3, 8, dtype=torch.float64)
        eager(x).sum().backward()
        compiled(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad)
    torch.testing.assert_close(layer.k_record.memory, eager.k_record.memory)
    torch._dynamo.reset()  # (a warm cache would reuse the graph-broken code)
    with pytest.raises(Exception, match=r"memory=0.5\) does not trace"):
        torch.compile(layer, fullgraph=True)(torch.randn(3, 8, dtype=torch.float64)).sum()
    torch._dynamo.reset()


def test_memory_refuses_create_graph_and_torch_func():
    layer = SparseLinear(5, 8, config=MePropConfig(k=2, memory=0.5))
    x = torch.randn(3, 5)
    loss = layer(x).pow(2).sum()
    with pytest.raises(RuntimeError, match="memory=0.5 .*create_graph=True"):
        torch.autograd.grad(loss, [layer.weight], create_graph=True)
    params = dict(layer.named_parameters())
    with pytest.raises(RuntimeError, match="memory=0.5 .*torch.func"):
        torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
