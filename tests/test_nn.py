"""SparseLinear and sparsify_/densify_: deep-copy, swap, compare, swap back."""

import copy

import pytest
import torch
from torch import nn

from meprop import MePropConfig, SparseLinear, densify_, hidden_layers, sparsify_
from meprop.reference import reference_backward


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        return self.inner(torch.relu(self.proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.squeeze = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.squeeze(self.blocks[0](x))
        return self.head(self.blocks[1](x).mean(-1, keepdim=True).expand(-1, 6) + x)


def linear_names(model, cls):
    return [n for n, m in model.named_modules() if type(m) is cls]


def test_sparsify_round_trip_nested():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    names = linear_names(model, nn.Linear)
    assert sparsify_(model, MePropConfig(k=2)) is model
    assert linear_names(model, SparseLinear) == names
    assert linear_names(model, nn.Linear) == []
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == list(before)
    assert densify_(model) is model
    assert linear_names(model, nn.Linear) == names
    assert not any(hasattr(m, "config") for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_root_linear_in_place():
    lin = nn.Linear(5, 4)
    w = lin.weight
    out = sparsify_(lin, MePropConfig(k=1))
    assert out is lin and isinstance(lin, SparseLinear) and lin.weight is w
    densify_(lin)
    assert type(lin) is nn.Linear


def test_filter_fn_gets_module_and_name():
    model = Net()
    calls = []

    def keep_blocks(module, name):
        calls.append((type(module), name))
        return name.startswith("blocks.0")

    sparsify_(model, MePropConfig(k=2), filter_fn=keep_blocks)
    assert linear_names(model, SparseLinear) == ["blocks.0.proj", "blocks.0.inner.0"]
    assert all(t is nn.Linear for t, _ in calls)
    assert [n for _, n in calls] == linear_names(Net(), nn.Linear)


def test_hidden_layers_keeps_output_dense():
    mlp = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 9), nn.ReLU(), nn.Linear(9, 2))
    sparsify_(mlp, MePropConfig(k=3), filter_fn=hidden_layers(mlp))
    assert [type(m) for m in mlp[::2]] == [SparseLinear, SparseLinear, nn.Linear]


def test_subclasses_of_linear_are_left_alone():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.warns(UserWarning, match=r"\['NonDynamicallyQuantizableLinear'\] are left alone"):
        sparsify_(mha, MePropConfig(k=2))
    assert not isinstance(mha.out_proj, SparseLinear)


def test_resparsify_updates_config():
    mlp = nn.Sequential(nn.Linear(4, 9))
    sparsify_(mlp, MePropConfig(k=3))
    sparsify_(mlp, MePropConfig(k=5, mode="unified"))
    assert mlp[0].config == MePropConfig(k=5, mode="unified")


def test_optimizer_built_before_swap_still_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsify_(model, MePropConfig(k=4), filter_fn=hidden_layers(model))
    x = torch.randn(16, 10)
    model(x).square().sum().backward()
    opt.step()
    w0, w_ref = model[0].weight, ref[0].weight
    changed = (w0 != w_ref).any(1)
    assert 0 < int(changed.sum()) <= 16 * 4
    assert not torch.equal(model[2].weight, ref[2].weight)  # dense output layer moved too


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_reference(mode, dtype, bias):
    dense = nn.Linear(7, 12, bias=bias, dtype=dtype)
    sparse = sparsify_(copy.deepcopy(dense), MePropConfig(k=3, mode=mode))
    x = torch.randn(4, 2, 7, dtype=dtype, requires_grad=True)
    y = sparse(x)
    assert torch.equal(y, dense(x))
    g = torch.randn_like(y)
    y.backward(g)
    rx, rw, rb = reference_backward(x.detach(), dense.weight.detach(), g, 3, mode)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(x.grad, rx, **tol)
    torch.testing.assert_close(sparse.weight.grad, rw, **tol)
    if bias:
        torch.testing.assert_close(sparse.bias.grad, rb, **tol)
    densify_(sparse)
    assert type(sparse) is nn.Linear


def test_large_k_module_equals_dense_exactly():
    dense = nn.Linear(7, 5)
    sparse = sparsify_(copy.deepcopy(dense), MePropConfig(k=5))
    x = torch.randn(3, 7)
    dense(x).square().sum().backward()
    sparse(x).square().sum().backward()
    assert torch.equal(dense.weight.grad, sparse.weight.grad)
    assert torch.equal(dense.bias.grad, sparse.bias.grad)


def test_constructor_repr_state_dict():
    layer = SparseLinear(5, 4, config=MePropConfig(k=2, mode="unified", sparse_grad=True))
    assert repr(layer) == (
        "SparseLinear(in_features=5, out_features=4, bias=True, k=2, mode=unified, "
        "sparse_grad=True)"
    )
    dense = nn.Linear(5, 4)
    layer.load_state_dict(dense.state_dict())
    assert list(layer.state_dict()) == ["weight", "bias"]
    with pytest.raises(TypeError, match=r"SparseLinear needs config=MePropConfig\(k=...\)"):
        SparseLinear(5, 4)
    with pytest.raises(TypeError, match="config must be a MePropConfig, got int"):
        sparsify_(dense, 20)


def test_deepcopy_and_pickle():
    import io

    layer = SparseLinear(3, 4, config=MePropConfig(k=2))
    clone = copy.deepcopy(layer)
    assert clone.config == layer.config and torch.equal(clone.weight, layer.weight)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, SparseLinear) and loaded.config.k == 2


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(mode, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsify_(model, MePropConfig(k=3, mode=mode), filter_fn=hidden_layers(model))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 12)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert int((model[0].weight.grad != 0).any(1).sum()) <= 8 * 3
