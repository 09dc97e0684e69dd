"""PyTorch's own ModuleInfo samples for nn.Linear, nn.LSTM and nn.Conv2d, run through
SparseLinear, SparseLSTM and SparseConv2d at k >= n: outputs and gradients must be the dense module's, and the error samples
must raise the same errors (torch.testing._internal.common_modules)."""

import copy

import pytest
import torch
from torch import nn

from meprop import MePropConfig, SparseConv2d, SparseLinear, SparseLSTM

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="torch's internal test helpers need expecttest (pip install expecttest)",
    exc_type=ImportError,
)

INFOS = {info.module_cls: info for info in common_modules.module_db}
SPARSE = {nn.Linear: SparseLinear, nn.LSTM: SparseLSTM, nn.Conv2d: SparseConv2d}
DTYPES = [torch.float32, torch.float64]


pytestmark = pytest.mark.usefixtures("one_thread")


def samples(cls, training):
    info = INFOS[cls]
    for dtype in DTYPES:
        for i, sample in enumerate(
            info.module_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=True, training=training
            )
        ):
            yield pytest.param(cls, sample, dtype, id=f"{cls.__name__}-{dtype}-{i}-{sample.desc}")


def width(module):
    """The units meProp selects from: out_features, out_channels (the usage record's width)."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def full_k(cls, module):
    """A k that keeps everything: the width, or the 4H-wide gate gradient."""
    return 4 * module.hidden_size if cls is nn.LSTM else width(module)


def leaves(out):
    """The tensors of a (nested) output."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in leaves(o)]


def run(module, args, kwargs):
    out = module(*args, **kwargs)
    outs = leaves(out)
    torch.manual_seed(1)
    grads = [torch.randn_like(t) for t in outs]
    inputs = [t for t in leaves([*args, *kwargs.values()]) if t.requires_grad]
    params = list(module.parameters())
    got = torch.autograd.grad(outs, inputs + params, grads, allow_unused=True)
    return outs, got


def cases():
    # A usage record makes SparseLinear and SparseConv2d run their autograd Function (with
    # k >= n they are otherwise plain F.linear, nn.Conv2d); SparseLSTM always runs its own.
    for usage in (False, True):
        for cls in (nn.Linear, nn.Conv2d):
            for p in samples(cls, True):
                yield pytest.param(*p.values, usage, id=f"{p.id}-{'usage' if usage else 'plain'}")
    yield from (pytest.param(*p.values, False, id=p.id) for p in samples(nn.LSTM, True))


@pytest.mark.parametrize("cls,sample,dtype,usage", list(cases()))
def test_samples_match_dense_module(cls, sample, dtype, usage):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    if kwargs.get("proj_size", 0):
        pytest.skip("SparseLSTM does not support proj_size (an error, tested in test_lstm)")
    torch.manual_seed(0)
    dense = cls(*args, **kwargs).to(dtype)
    cfg = MePropConfig(k=full_k(cls, dense))
    sparse = SPARSE[cls](*args, **kwargs, config=cfg).to(dtype)
    sparse.load_state_dict(dense.state_dict())
    if usage:
        sparse.usage = (torch.zeros(width(dense), dtype=dtype), torch.zeros(1))
    fwd = sample.forward_input
    out_d, grads_d = run(dense, *copy.deepcopy((fwd.args, fwd.kwargs)))
    out_s, grads_s = run(sparse, *copy.deepcopy((fwd.args, fwd.kwargs)))
    assert len(out_d) == len(out_s)
    for a, b in zip(out_s, out_d, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    for a, b in zip(grads_s, grads_d, strict=True):
        torch.testing.assert_close(a, b)


def error_samples():
    info = INFOS[nn.LSTM]
    for dtype in DTYPES:
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=False, training=True
        )
        for i, err in enumerate(errors):
            yield pytest.param(err, id=f"LSTM-{dtype}-{i}-{err.error_regex[:30]}")


@pytest.mark.parametrize("err", list(error_samples()))
def test_lstm_error_samples_raise_as_nn_lstm(err):
    sample = err.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    construction = err.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR
    with pytest.raises(err.error_type, match=err.error_regex):
        lstm = SparseLSTM(*args, **kwargs, config=MePropConfig(k=1))
        assert not construction, "constructed where nn.LSTM refuses"
        lstm(*sample.forward_input.args, **sample.forward_input.kwargs)
