"""Row-sparse weight gradients (sparse_grad=True) with optimizers and utilities.

What works is documented in meprop/grads.py and the README; these tests pin it down: a step
with sparse gradients equals the step with the same gradients dense (SGD, Adagrad),
SparseAdam moves only the touched rows, accumulation over backward calls adds up, the
optimizers that cannot take them raise, and meprop.clip_grad_norm_ clips them like dense ones.
"""

import copy

import pytest
import torch

from meprop import MePropConfig, SparseLinear, clip_grad_norm_


def pair(mode="per_example", k=2):
    """A layer with row-sparse gradients and a copy of it with dense ones."""
    sparse = SparseLinear(8, 12, config=MePropConfig(k=k, mode=mode, sparse_grad=True))
    dense = copy.deepcopy(sparse)
    dense.config = MePropConfig(k=k, mode=mode)
    return sparse, dense


def backward(layer, x, g):
    layer(x).backward(g)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    ],
    ids=["sgd", "sgd_momentum", "adagrad"],
)
def test_step_equals_dense_step(mode, make):
    sparse, dense = pair(mode)
    opt_s, opt_d = make(sparse.parameters()), make(dense.parameters())
    for _ in range(3):
        x, g = torch.randn(5, 8), torch.randn(5, 12)
        for layer, opt in ((sparse, opt_s), (dense, opt_d)):
            opt.zero_grad()
            backward(layer, x, g)
        assert sparse.weight.grad.is_sparse and not dense.weight.grad.is_sparse
        torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
        opt_s.step()
        opt_d.step()
        torch.testing.assert_close(sparse.weight, dense.weight)
        torch.testing.assert_close(sparse.bias, dense.bias)


def test_sparse_adam_moves_only_touched_rows():
    sparse, _ = pair()
    opt = torch.optim.SparseAdam([sparse.weight], lr=0.1)
    before = sparse.weight.detach().clone()
    backward(sparse, torch.randn(3, 8), torch.randn(3, 12))
    touched = sparse.weight.grad.coalesce().indices()[0]
    opt.step()
    moved = (sparse.weight != before).any(1).nonzero().flatten()
    assert set(moved.tolist()) == set(touched.tolist())


def test_accumulation_over_backward_calls():
    sparse, dense = pair()
    for _ in range(2):
        x, g = torch.randn(4, 8), torch.randn(4, 12)
        backward(sparse, x, g)
        backward(dense, x, g)
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    # An existing dense .grad stays dense and takes the sparse gradient in.
    sparse.weight.grad = dense.weight.grad.clone()
    x, g = torch.randn(4, 8), torch.randn(4, 12)
    backward(sparse, x, g)
    backward(dense, x, g)
    assert not sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda ps: torch.optim.Adam(ps), "does not support sparse gradients"),
        (lambda ps: torch.optim.AdamW(ps), "does not support sparse gradients"),
        (lambda ps: torch.optim.RMSprop(ps), "does not support sparse gradients"),
        (lambda ps: torch.optim.Adagrad(ps, weight_decay=0.1), "not compatible with sparse"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1), r"add\(sparse, dense\)"),
    ],
    ids=["adam", "adamw", "rmsprop", "adagrad_weight_decay", "sgd_weight_decay"],
)
def test_unsupported_optimizers_raise(make, match):
    # The documented failures (meprop/grads.py, README): torch raises, at the first step.
    sparse, _ = pair()
    opt = make([sparse.weight])
    backward(sparse, torch.randn(3, 8), torch.randn(3, 12))
    with pytest.raises(RuntimeError, match=match):
        opt.step()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_takes_sparse_grads(norm_type):
    sparse, dense = pair()
    for _ in range(2):  # two calls: repeated rows, coalesced by the clip
        x, g = torch.randn(4, 8), torch.randn(4, 12)
        backward(sparse, x, g)
        backward(dense, x, g)
    other = torch.nn.Parameter(sparse.weight.detach().clone())
    other.grad = sparse.weight.grad.clone()
    with pytest.raises(NotImplementedError):  # torch's own does not take them
        torch.nn.utils.clip_grad_norm_([other], 0.1, norm_type)
    want = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.1, norm_type)
    got = clip_grad_norm_(sparse.parameters(), 0.1, norm_type)
    torch.testing.assert_close(got, want)
    assert sparse.weight.grad.is_sparse and sparse.weight.grad.is_coalesced()
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    # Below the threshold nothing changes; nothing to clip gives 0.
    before = sparse.weight.grad.to_dense().clone()
    clip_grad_norm_(sparse.parameters(), 1e9, norm_type)
    torch.testing.assert_close(sparse.weight.grad.to_dense(), before)
    assert float(clip_grad_norm_(torch.nn.Linear(2, 2).parameters(), 1.0)) == 0.0


def test_clip_grad_norm_nonfinite():
    sparse, _ = pair()
    g = torch.randn(3, 12)
    g[0, 0] = float("inf")
    backward(sparse, torch.randn(3, 8), g)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(sparse.parameters(), 1.0, error_if_nonfinite=True)
