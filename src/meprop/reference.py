"""The obviously-right meProp backward, for tests and checks: mask the output gradient, then
the dense formulas. Every fast path (``meprop.ops``, the kernels, ``SparseLSTM``) is tested
against these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MODES
from .ops import select_columns

__all__ = ["mask_gradient", "reference_backward"]


def mask_gradient(g: Tensor, k: int, mode: str, cols_or_idx: Tensor | None = None) -> Tensor:
    """``g`` (M, n) with everything but the selected entries set to zero.

    For ``random`` the selection must be passed in (``cols_or_idx``: the (M, k) indices), since
    it cannot be recomputed.
    """
    n = g.shape[1]
    if k >= n:
        return g.clone()
    if mode == "unified":
        cols = select_columns(g, k) if cols_or_idx is None else cols_or_idx
        mask = torch.zeros(n, dtype=torch.bool, device=g.device)
        mask[cols] = True
        return g * mask
    if mode == "per_example":
        idx = g.abs().topk(k, dim=1).indices if cols_or_idx is None else cols_or_idx
    elif mode == "random":
        if cols_or_idx is None:
            raise ValueError("mode='random' needs the drawn indices (cols_or_idx)")
        idx = cols_or_idx
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx))


def reference_backward(
    x: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    k: int,
    mode: str,
    sparse_bias: bool = False,
    selection: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The obviously-right meProp backward: mask g, then the dense formulas.

    Returns (dx shaped like x, dW (n, in), db (n,)).
    """
    n, d_in = weight.shape
    g = grad_out.reshape(-1, n)
    gs = mask_gradient(g, k, mode, selection)
    dx = (gs @ weight).reshape(x.shape)
    dw = gs.t() @ x.reshape(-1, d_in)
    db = (gs if sparse_bias else g).sum(0)
    return dx, dw, db
