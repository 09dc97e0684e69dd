"""sparsify_'s layer registry: Hugging Face Conv1D (GPT-2), the no-op warning, converted(),
uninitialised lazy layers and filter_fn's signature."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from meprop import MePropConfig, convert, converted, densify_, sparsify_
from meprop.convert import register_layer
from meprop.reference import reference_backward

CFG = MePropConfig(k=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_nothing_converted_warns_and_returns_model():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="sparsify_ converted no layer: Sequential has no exact"):
        assert sparsify_(model, CFG) is model
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="that filter_fn accepts"):
        sparsify_(mlp, CFG, filter_fn=lambda module, name: name == "mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify_(mlp, CFG)  # converts: no warning
        sparsify_(mlp, MePropConfig(k=5))  # new config for meProp layers: no warning either


def test_converted_reports_meprop_layers():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 3), nn.Linear(3, 2))
    assert converted(mlp) == {}
    sparsify_(mlp, CFG, filter_fn=lambda module, name: name != "3")
    assert converted(mlp) == {
        "0": "SparseLinear(from Linear, k=3, mode=per_example)",
        "2": "SparseLSTM(from LSTM, k=3, mode=per_example)",
    }
    densify_(mlp)
    assert converted(mlp) == {}


def test_root_module_is_named_empty():
    assert list(converted(sparsify_(nn.Linear(3, 4), CFG))) == [""]


def test_one_argument_filter_is_a_clear_type_error():
    mlp = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(TypeError, match=r"filter_fn must take two arguments \(module, qualified"):
        sparsify_(mlp, CFG, filter_fn=lambda name: True)
    with pytest.raises(TypeError, match="filter_fn must take two arguments"):
        densify_(mlp, filter_fn=lambda module: True)
    sparsify_(mlp, CFG, filter_fn=lambda *args: True)  # anything that binds two is fine


def test_uninitialised_lazy_linear_is_an_error():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"\['0'\] are uninitialised nn.LazyLinear"):
        sparsify_(model, CFG)
    assert type(model[2]) is nn.Linear  # nothing converted before the error
    sparsify_(model, CFG, filter_fn=lambda module, name: name == "2")  # excluded: fine
    model(torch.randn(5, 4))  # initialised: now an nn.Linear
    sparsify_(model, CFG)
    assert list(converted(model)) == ["0", "2"]


def test_register_a_layer_type():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    class SparseScale(Scale):
        pass

    def to_sparse(module, config):
        module.__class__, module.config = SparseScale, config

    def to_dense(module):
        module.__class__ = Scale
        del module.config

    register_layer(Scale, SparseScale, to_sparse, to_dense)
    try:
        model = nn.Sequential(Scale())
        want = {"0": "SparseScale(from Scale, k=3, mode=per_example)"}
        assert converted(sparsify_(model, CFG)) == want
        assert type(densify_(model)[0]) is Scale
    finally:
        convert._BY_DENSE.pop(Scale), convert._BY_SPARSE.pop(SparseScale)


# --------------------------------------------------------------------------------------------
# Hugging Face Conv1D (GPT-2)

try:
    import transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # an optional extra: the tests above still run
    transformers = None

needs_hf = pytest.mark.skipif(
    transformers is None, reason="transformers not installed (pip install -e '.[hf]')"
)


def conv1d(nx=6, nf=10):
    torch.manual_seed(0)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.bias)
    return layer


@needs_hf
@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("k", [3, 10])
def test_conv1d_matches_reference(mode, k):
    dense = conv1d()
    sparse = sparsify_(copy.deepcopy(dense), MePropConfig(k=k, mode=mode))
    assert type(sparse).__name__ == "SparseConv1D" and isinstance(sparse, Conv1D)
    assert repr(sparse) == f"SparseConv1D(nf=10, nx=6, k={k}, mode={mode})"
    x = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dense.double(), sparse.double()
    y, y_ref = sparse(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    if k >= 10:
        pairs = [(x.grad, x_ref.grad), (sparse.weight.grad, dense.weight.grad)]
    else:
        rx, rw, rb = reference_backward(x.detach(), dense.weight.detach().t(), g, k, mode)
        pairs = [(x.grad, rx), (sparse.weight.grad, rw.t()), (sparse.bias.grad, rb)]
        assert int((sparse.weight.grad != 0).any(0).sum()) <= (
            8 * k if mode == "per_example" else k
        )
    for got, want in pairs:
        torch.testing.assert_close(got, want)


@needs_hf
def test_gpt2_mlp_converts_keeping_parameters_optimizer_and_state_dict():
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    original = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap

    sparsify_(model, MePropConfig(k=8, mode="unified"), filter_fn=lambda m, name: ".mlp." in name)
    assert sorted(converted(model)) == [
        f"transformer.h.{i}.mlp.{p}" for i in (0, 1) for p in ("c_fc", "c_proj")
    ]
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.shape == (32, 128)  # (in, out), as stored by Conv1D

    ids = torch.randint(0, 64, (3, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    # meProp: each backward touches at most k of the 128 hidden units' columns of c_fc.
    assert int((c_fc.weight.grad != 0).any(0).sum()) <= 8
    before = c_fc.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(c_fc.weight, before)

    original.load_state_dict(model.state_dict())  # loads into the unconverted model
    original.eval(), model.eval()
    torch.testing.assert_close(original(input_ids=ids).logits, model(input_ids=ids).logits)
    densify_(model)
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D and converted(model) == {}


@needs_hf
def test_conv1d_pickles_and_rejects_sparse_grad():
    layer = sparsify_(conv1d(), CFG)
    again = pickle.loads(pickle.dumps(layer))
    assert type(again) is type(layer) and torch.equal(again.weight, layer.weight)
    with pytest.raises(ValueError, match="sparse_grad=True is not supported for Conv1D"):
        sparsify_(nn.Sequential(nn.Linear(3, 4), conv1d()), MePropConfig(k=2, sparse_grad=True))


@needs_hf
def test_conv1d_under_autocast():
    layer = sparsify_(conv1d(), MePropConfig(k=3, mode="unified"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(5, 6))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    assert int((layer.weight.grad != 0).any(0).sum()) == 3


# --------------------------------------------------------------------------------------------
# Parametrized layers (torch.nn.utils.parametrize): meProp's backward on the parametrized
# weight, then the parametrization's own backward to its original tensors.

P = torch.nn.utils.parametrizations
PARAMETRIZE = {
    "weight_norm": lambda m: P.weight_norm(m),
    "spectral_norm": lambda m: P.spectral_norm(m),
    "custom": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Scale()),
}


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w.tanh()


@pytest.mark.parametrize("kind", list(PARAMETRIZE))
@pytest.mark.parametrize("before", [True, False], ids=["parametrized_first", "sparsified_first"])
def test_parametrized_linear_converts_and_matches_reference(kind, before):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    if before:
        PARAMETRIZE[kind](model[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify_(model, CFG)
    if not before:
        PARAMETRIZE[kind](model[0])
    assert isinstance(model[0], convert.SparseLinear)
    assert type(model[0]).__name__ == "ParametrizedSparseLinear"
    assert converted(model)["0"] == "SparseLinear(from Linear, k=3, mode=per_example)"
    model.eval()  # (spectral_norm: no power iteration, the same weight in both passes)
    x = torch.randn(6, 5, dtype=torch.float64)
    originals = list(model[0].parametrizations.weight.parameters())
    # reference: the layer's output gradient g masked, the dense formulas for dW, then the
    # parametrization's own backward from dW to its originals
    w = model[0].weight  # the parametrized weight, a function of the originals
    out = torch.nn.functional.linear(x, w, model[0].bias)
    g = torch.autograd.grad(model[2](model[1](out)).square().sum(), out)[0]
    _, dw, db = reference_backward(x, w.detach(), g, 3, "per_example")
    want = torch.autograd.grad(w, originals, dw)
    model.zero_grad()
    model(x).square().sum().backward()
    for p, e in zip(originals, want, strict=True):
        torch.testing.assert_close(p.grad, e)
    torch.testing.assert_close(model[0].bias.grad, db)
    densify_(model)
    assert type(model[0]).__name__ == "ParametrizedLinear" and converted(model) == {}
    assert not isinstance(model[0], convert.SparseLinear)
    torch.nn.utils.parametrize.remove_parametrizations(model[0], "weight")
    assert type(model[0]) is nn.Linear


def test_parametrized_lstm_converts_and_back():
    lstm = nn.LSTM(3, 4)
    torch.nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l0")
    sparsify_(lstm, CFG)
    assert isinstance(lstm, convert.SparseLSTM) and list(converted(lstm)) == [""]
    lstm(torch.randn(5, 2, 3))[0].sum().backward()
    assert all(p.grad is not None for p in lstm.parameters())
    densify_(lstm)
    assert type(lstm).__name__ == "ParametrizedLSTM" and not isinstance(lstm, convert.SparseLSTM)


def test_nothing_converted_names_what_is_there():
    with pytest.warns(UserWarning) as record:
        sparsify_(nn.Bilinear(3, 4, 5), CFG)
    (msg,) = [str(w.message) for w in record]
    assert "its layers with parameters: ['Bilinear']" in msg
    assert "NonDynamicallyQuantizableLinear" not in msg and "subclasses" not in msg
