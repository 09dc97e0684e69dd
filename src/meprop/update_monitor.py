"""The parameter-update statistic of the extended meProp paper's meAct analysis.

Sun et al. (TKDE) measure how much training moves the parameters: with Adam the gradient is
not the update, so they take the update itself,

    avg change = 1 / (T P) * sum over iterations t = 1..T, parameters i = 1..P of
                 |theta_i(t) - theta_i(t - 1)|

averaged per epoch. Their finding: it drops sharply when meAct starts, while accuracy rises
(normal training keeps moving parameters to fit noise). ``UpdateMonitor`` measures it for any
optimizer by differencing the parameters around each step; the sums stay on the parameters'
device and are read once per window (``read``), so a step costs no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["UpdateMonitor"]


class UpdateMonitor:
    """Mean absolute parameter change per optimizer step, averaged over a window of steps.

    Args:
        params: the parameters to watch (e.g. ``model.parameters()``). A copy of them is kept
            (as much memory again as the parameters).

    Call ``step()`` right after each ``optimizer.step()``; ``read()`` returns the mean over
    the steps since the last ``read()`` of (sum of |change| / number of parameters), and
    starts a new window. If the Parameters themselves are replaced (meSimp's shrinking),
    ``rebind(new_params)`` before the next ``step()``.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> monitor = UpdateMonitor(layer.parameters())
        >>> layer(torch.ones(1, 3)).sum().backward()  # every gradient entry is 1
        >>> opt.step(); monitor.step()
        >>> round(monitor.read(), 6)  # lr * |grad|
        0.1
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.rebind(params)
        self._sum: Tensor | None = None  # float64, on the first parameter's device
        self._steps = 0

    def rebind(self, params: Iterable[nn.Parameter]) -> None:
        """Watch these parameters from their current values on."""
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("UpdateMonitor needs at least one parameter")
        self.numel = sum(p.numel() for p in self.params)
        self._prev = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        """Add this step's mean |change| to the window; remember the parameters' new values."""
        # prev <- |prev - new| = |change| in place (no allocation); abs + sum is several times
        # faster than an L1 norm on the CPU.
        params = [p.detach() for p in self.params]
        torch._foreach_sub_(self._prev, params)
        torch._foreach_abs_(self._prev)
        dev = self._prev[0].device
        sums = torch.stack([t.sum().to(dev, torch.float64) for t in self._prev])
        total = sums.sum() / self.numel
        self._sum = total if self._sum is None else self._sum + total
        torch._foreach_copy_(self._prev, params)
        self._steps += 1

    def read(self) -> float | None:
        """Mean absolute change per parameter per step since the last read (None if no step)."""
        if not self._steps:
            return None
        value = float(self._sum) / self._steps
        self._sum, self._steps = None, 0
        return value
