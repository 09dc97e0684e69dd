"""Wall-clock accounting of a training step, and of the linear maps' share of backward.

The paper's speedups count "the linear-map part of back propagation": the backward of each
linear layer (its dx and dW products, plus selection for meProp). ``LinearBackwardTimer``
measures it with hooks, without touching the layers: the clock starts when the gradient of a
layer's output is ready and stops when the layer's last gradient (input or weight) has been
computed. CPU only: on a GPU these would be launch times (use CUDA events there).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["LinearBackwardTimer", "Stopwatch"]


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


class LinearBackwardTimer:
    """Sums, over training steps, the seconds spent in the backward of every ``nn.Linear``.

    Usage: ``timer = LinearBackwardTimer(model)``; after each ``loss.backward()`` call
    ``timer.lap()``; ``timer.seconds`` holds the total; ``timer.remove()`` detaches the hooks.
    Layers added by shrinking keep their hooks (parameters are never replaced).
    """

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        self._start: dict[int, float] = {}
        self._end: dict[int, float] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._on_forward))
                key = id(module)
                for p in module.parameters(recurse=False):
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(lambda _p, key=key: self._stop(key))
                    )

    def _stop(self, key: int) -> None:
        if key in self._start:
            self._end[key] = time.perf_counter()

    def _on_forward(self, module, inputs, output) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        key = id(module)

        def start(_grad):
            self._start[key] = time.perf_counter()

        def stop(_grad):
            self._stop(key)

        output.register_hook(start)
        x = inputs[0]
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(stop)

    def lap(self) -> float:
        """Close one backward pass: add its linear-map seconds to the total and return them."""
        s = sum(self._end[k] - t for k, t in self._start.items() if k in self._end)
        self._start.clear()
        self._end.clear()
        self.seconds += s
        return s

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
