"""meProp layers under torch.autocast: outputs in the autocast dtype, gradients in the
parameters' dtype, backward inside or outside the autocast block.

Reference: nn.Linear / nn.LSTM under the same autocast (k >= n), and the masked reference on
the inputs rounded to the autocast dtype (k < n). CPU autocast runs bfloat16; CUDA's float16 and
bfloat16 take the same code path (the casts depend only on the tensors' device type).
"""

import copy

import pytest
import torch
from torch import nn

from meprop import MePropConfig, SparseLSTM, sparsify_
from meprop.reference import reference_backward

BF16 = torch.bfloat16
TOL = dict(rtol=2e-2, atol=2e-2)  # bfloat16 rounding of the products


pytestmark = pytest.mark.usefixtures("one_thread")


def distinct_grad(lead, n):
    """An output gradient whose top-k sets are unambiguous in bfloat16 (as in test_ops)."""
    mags = (torch.randperm(n) + 1).float()
    signs = torch.randint(0, 2, (*lead, n)).float() * 2 - 1
    return (signs * mags / n).to(BF16)


def forward_backward(module, x, g, inside, dtype=BF16):
    """Forward under CPU autocast (bfloat16 unless said), backward(g) inside or after it."""
    with torch.autocast("cpu", dtype=dtype):
        y = module(x)
        if inside:
            y.backward(g)
    if not inside:
        y.backward(g)
    return y


@pytest.mark.parametrize("inside", [True, False], ids=["backward_inside", "backward_outside"])
@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("k", [3, 12])
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bfloat16", "float16"])
def test_linear_matches_masked_reference(inside, mode, sparse_grad, k, dtype):
    # CPU autocast runs float16 too: CUDA's two autocast dtypes, on the same code path
    torch.manual_seed(0)
    dense = nn.Linear(7, 12)
    sparse = sparsify_(copy.deepcopy(dense), MePropConfig(k=k, mode=mode, sparse_grad=sparse_grad))
    x = torch.randn(4, 2, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = distinct_grad((4, 2), 12).to(dtype)

    y = forward_backward(sparse, x, g, inside, dtype)
    y_ref = forward_backward(dense, x_ref, g, inside, dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same bfloat16 GEMM
    dw = sparse.weight.grad.to_dense() if sparse_grad else sparse.weight.grad
    assert sparse.weight.grad.is_sparse == sparse_grad
    assert x.grad.dtype == dw.dtype == sparse.bias.grad.dtype == torch.float32
    if k >= 12:  # everything kept: nn.Linear's gradients under autocast
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
        torch.testing.assert_close(dw, dense.weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=0, atol=0)
        return
    # The masked reference, in float64 on the operands autocast rounded to bfloat16.
    rx, rw, rb = reference_backward(
        x.detach().to(dtype).double(), dense.weight.detach().to(dtype).double(), g.double(), k, mode
    )
    torch.testing.assert_close(x.grad.double(), rx, **TOL)
    torch.testing.assert_close(dw.double(), rw, **TOL)
    torch.testing.assert_close(sparse.bias.grad.double(), rb, **TOL)
    assert int((dw != 0).any(1).sum()) <= (8 * k if mode == "per_example" else k)


@pytest.mark.parametrize("inside", [True, False], ids=["backward_inside", "backward_outside"])
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_triton_kernels_under_autocast(monkeypatch, inside, dtype, mode):
    """backend="triton" (the kernels a CUDA run takes) under autocast, here in Triton's
    interpreter on CPU tensors: the same outputs, dtypes and masked-reference gradients."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    layer = sparsify_(nn.Linear(11, 13), MePropConfig(k=4, mode=mode, backend="triton"))
    x = torch.randn(9, 11, requires_grad=True)
    g = distinct_grad((9,), 13).to(dtype)
    y = forward_backward(layer, x, g, inside, dtype)
    assert y.dtype == dtype
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    rx, rw, rb = reference_backward(
        x.detach().to(dtype).double(), layer.weight.detach().to(dtype).double(), g.double(), 4, mode
    )
    torch.testing.assert_close(x.grad.double(), rx, **TOL)
    torch.testing.assert_close(layer.weight.grad.double(), rw, **TOL)
    torch.testing.assert_close(layer.bias.grad.double(), rb, **TOL)


def test_linear_usage_record_and_random_under_autocast():
    layer = sparsify_(nn.Linear(6, 10), MePropConfig(k=2, mode="random"))
    layer.usage = (torch.zeros(10), torch.zeros(1))
    x = torch.randn(5, 6)
    y = forward_backward(layer, x, torch.ones(5, 10, dtype=BF16), inside=False)
    assert y.dtype == BF16 and layer.weight.grad.dtype == torch.float32
    assert int(layer.usage[0].sum()) == 5 * 2 and int(layer.usage[1]) == 5


def test_float64_layer_is_not_cast():
    # autocast leaves float64 alone; so do the meProp layers.
    layer = sparsify_(nn.Linear(6, 10).double(), MePropConfig(k=2))
    y = forward_backward(layer, torch.randn(3, 6, dtype=torch.float64), torch.ones(3, 10), False)
    assert y.dtype == torch.float64 and layer.weight.grad.dtype == torch.float64


def lstm_pair(k, mode, sparse_grad=False):
    torch.manual_seed(0)
    dense = nn.LSTM(4, 5, 2, bidirectional=True)
    config = MePropConfig(k=k, mode=mode, sparse_grad=sparse_grad)
    sparse = SparseLSTM(4, 5, 2, bidirectional=True, config=config)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def lstm_run(module, x, hx, weights, inside):
    with torch.autocast("cpu", dtype=BF16):
        try:
            out, (h, c) = module(x, hx)
        except RuntimeError as e:  # torch's own LSTM, on a CPU oneDNN has no kernel for
            if type(module) is nn.LSTM and "primitive descriptor" in str(e):
                pytest.skip(f"nn.LSTM under bfloat16 autocast cannot run on this CPU: {e}")
            raise
        loss = (out.float() * weights[0]).sum() + (h.float() * weights[1]).sum()
        if inside:
            loss.backward()
    if not inside:
        loss.backward()
    return out, h, c


@pytest.mark.parametrize("inside", [True, False], ids=["backward_inside", "backward_outside"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_lstm_dense_k_matches_nn_lstm(inside, with_hx):
    dense, sparse = lstm_pair(20, "per_example")
    x = torch.randn(6, 3, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    hx = tuple(torch.randn(4, 3, 5) for _ in "hc") if with_hx else None
    weights = (torch.randn(6, 3, 10), torch.randn(4, 3, 5))
    out, h, c = lstm_run(sparse, x, hx, weights, inside)
    out_ref, h_ref, c_ref = lstm_run(dense, x_ref, hx, weights, inside)
    assert out.dtype == out_ref.dtype == BF16 and h.dtype == c.dtype == BF16
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a.float(), b.float(), **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=5e-2, atol=5e-2)
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2, msg=n)


@pytest.mark.parametrize("inside", [True, False], ids=["backward_inside", "backward_outside"])
@pytest.mark.parametrize("mode,sparse_grad", [("per_example", False), ("unified", True)])
def test_lstm_sparse_equals_the_model_in_bfloat16(inside, mode, sparse_grad):
    # Under autocast the layer computes exactly what the same model cast to bfloat16 computes
    # (whose meProp backward test_lstm checks against the reference); gradients come back in
    # float32.
    _, sparse = lstm_pair(3, mode, sparse_grad)
    in_bf16 = copy.deepcopy(sparse).to(BF16)
    x = torch.randn(6, 3, 4, requires_grad=True)
    weights = (torch.randn(6, 3, 10), torch.randn(4, 3, 5))
    out, h, _ = lstm_run(sparse, x, None, weights, inside)
    x_b = x.detach().to(BF16).requires_grad_(True)
    out_b, (h_b, _) = in_bf16(x_b)
    ((out_b.float() * weights[0]).sum() + (h_b.float() * weights[1]).sum()).backward()
    torch.testing.assert_close(out, out_b, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_b.grad.float(), rtol=0, atol=0)
    for (n, p), q in zip(sparse.named_parameters(), in_bf16.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        assert p.grad.is_sparse == (sparse_grad and n.startswith("weight"))
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=0, atol=0, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_cuda_autocast_linear_and_lstm(dtype, mode):
    layer = sparsify_(nn.Linear(7, 12).cuda(), MePropConfig(k=3, mode=mode))
    x = torch.randn(8, 7, device="cuda")
    g = distinct_grad((8,), 12).to(dtype).cuda()
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    y.backward(g)  # outside the block
    assert y.dtype == dtype and layer.weight.grad.dtype == torch.float32
    rx, rw, rb = reference_backward(
        x.to(dtype).double(), layer.weight.detach().to(dtype).double(), g.double(), 3, mode
    )
    torch.testing.assert_close(layer.weight.grad.double(), rw, **TOL)
    lstm = SparseLSTM(4, 5, config=MePropConfig(k=3, mode=mode)).cuda()
    with torch.autocast("cuda", dtype=dtype):
        out, _ = lstm(torch.randn(6, 3, 4, device="cuda"))
    out.float().sum().backward()
    assert out.dtype == dtype and lstm.weight_hh_l0.grad.dtype == torch.float32
