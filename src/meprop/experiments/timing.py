"""Wall-clock accounting of a training step, and of chosen layers' share of backward.

The paper's speedups count "the linear-map part of back propagation": the backward of each
linear layer (its dx and dW products, plus selection for meProp), and of each LSTM (whose
backward through time is made of the gate linear maps and their elementwise glue).
``BackwardTimer`` measures it with hooks, without touching the layers: a layer's clock starts
when the gradient of its output is ready and stops when its last gradient (input or weight)
has been computed. The input gradient is the layer's own: the layer reads a view of its input
(``view_as``, free), and the stop hook sits on that view, so an input that other modules read
too (a ResNet block's input, read by its first convolution and its shortcut) stops the clock
when this layer's share is done, not when every reader's is. CPU only: on a GPU these would be
launch times (use CUDA events there).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["BackwardTimer", "linear_maps", "Stopwatch"]


class Stopwatch:
    """Named accumulators of seconds: ``with sw("forward"): ...``; ``sw.totals``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0

    def reset(self) -> None:
        self.totals.clear()


def linear_maps(model: nn.Module) -> list[nn.Module]:
    """The modules whose backward is "the linear-map part": every Linear, LSTM and Conv2d."""
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.LSTM | nn.Conv2d)]


def _tensor(x):
    """The tensor behind a module input or output (a PackedSequence's data; an LSTM's output
    sequence out of ``(output, (h, c))``)."""
    if isinstance(x, tuple) and not isinstance(x, PackedSequence):
        x = x[0] if x else None
    if isinstance(x, PackedSequence):
        x = x.data
    return x if isinstance(x, torch.Tensor) else None


class BackwardTimer:
    """Sums, over training steps, the seconds spent in the backward of the given modules.

    Usage: ``timer = BackwardTimer(linear_maps(model))``; after each ``loss.backward()`` call
    ``timer.lap()``; ``timer.seconds`` holds the total, ``timer.last`` the last lap's seconds
    per module (by ``id``: sums over a subset of the modules need no second timer);
    ``timer.remove()`` detaches the hooks. Hooks sit on the modules and on their Parameters:
    after meSimp replaces Parameters, build a new timer.
    """

    def __init__(self, modules) -> None:
        self.seconds = 0.0
        self.last: dict[int, float] = {}
        self._start: dict[int, float] = {}
        self._end: dict[int, float] = {}
        self._handles = []
        for module in {id(m): m for m in modules}.values():  # each module hooked once
            self._handles.append(module.register_forward_pre_hook(self._own_input))
            self._handles.append(module.register_forward_hook(self._on_forward))
            key = id(module)
            for p in module.parameters(recurse=False):
                self._handles.append(
                    p.register_post_accumulate_grad_hook(lambda _p, key=key: self._stop(key))
                )

    def _stop(self, key: int) -> None:
        if key in self._start:
            self._end[key] = time.perf_counter()

    @staticmethod
    def _own_input(module, args):
        """The layer reads a view of its input tensor: the gradient of the view is this layer's
        input gradient alone (``_on_forward`` hooks it), where the input's own gradient waits
        for every module that reads it. (A PackedSequence is left as it is.)"""
        x = args[0] if args else None
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            return (x.view_as(x), *args[1:])
        return None

    def _on_forward(self, module, inputs, output) -> None:
        out = _tensor(output)
        if not torch.is_grad_enabled() or out is None or not out.requires_grad:
            return
        key = id(module)

        def start(_grad):
            self._start[key] = time.perf_counter()

        def stop(_grad):
            self._stop(key)

        out.register_hook(start)
        x = _tensor(inputs[0]) if inputs else None
        if x is not None and x.requires_grad:
            x.register_hook(stop)

    def lap(self) -> float:
        """Close one backward pass: add its seconds to the total and return them (``last``:
        per module)."""
        self.last = {k: self._end[k] - t for k, t in self._start.items() if k in self._end}
        s = sum(self.last.values())
        self._start.clear()
        self._end.clear()
        self.seconds += s
        return s

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
