"""The trainer's backward clocks (``meprop.experiments.timing.BackwardTimer``): a layer's time is
its own backward, also where its input feeds other modules too (a ResNet block's shortcut)."""

import time

import torch
from torch import nn

from meprop.experiments.timing import BackwardTimer


class _Slow(torch.autograd.Function):
    """Identity whose backward sleeps: another reader of the input, slow to finish."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(0.2)
        return g


def test_a_layer_whose_input_has_another_reader_is_timed_alone():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    timer = BackwardTimer([lin])
    x = torch.randn(4, 8, requires_grad=True)
    # the slow reader is made first: autograd runs it after the layer (later nodes first), so
    # x's whole gradient is ready 0.2 s after the layer's share of it
    y = _Slow.apply(x) + lin(x)
    t0 = time.perf_counter()
    y.sum().backward()
    whole = time.perf_counter() - t0
    layer = timer.lap()
    assert whole >= 0.2 and 0 < layer < 0.1  # the layer's own backward, not the other reader's
    ref = x.grad.clone()
    timer.remove()
    x.grad = None
    (_Slow.apply(x) + lin(x)).sum().backward()
    torch.testing.assert_close(x.grad, ref)  # the view changes no gradient


def test_a_chain_of_layers_is_timed_as_before_and_never_beyond_the_backward():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    timer = BackwardTimer([net[0], net[2]])
    x = torch.randn(5, 16, requires_grad=True)
    t0 = time.perf_counter()
    net(x).sum().backward()
    whole = time.perf_counter() - t0
    assert 0 < timer.lap() <= whole
    with torch.no_grad():  # no graph: no hooks, no view
        net(x)
    assert timer.lap() == 0
