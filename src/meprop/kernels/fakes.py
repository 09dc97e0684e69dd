"""Fake (meta) implementations of the row-sparse kernel ops, shared by every backend.

``torch.compile`` traces a custom op through its fake implementation: the output shapes and
dtypes from the input shapes alone. The C++/numba ops (``torch.ops.meprop.*``,
``meprop.kernels.registry``) and the Triton ops (``torch.ops.meprop_triton.*``,
``meprop.kernels.triton_ops``) compute the same things, so they register these same functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_rows", "rows_matmul", "rows_outer", "rows_outer_dense"]


def topk_rows(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """idx (M, k) int64 and vals (M, k) for g (M, n)."""
    torch._check(g.dim() == 2, lambda: f"g must be (M, n), got shape {tuple(g.shape)}")
    torch._check_value(1 <= k <= g.shape[1], lambda: f"k must be in [1, n], got k={k}")
    m = g.shape[0]
    return g.new_empty((m, k), dtype=torch.int64), g.new_empty((m, k))


def rows_matmul(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """dx (M, in) for idx, vals (M, k) and weight (n, in)."""
    return weight.new_empty((idx.shape[0], weight.shape[1]))


def rows_outer(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """rows (R,) and dw_rows (R, in): R, the distinct rows, is data-dependent (<= n)."""
    r = torch.library.get_ctx().new_dynamic_size()
    return idx.new_empty((r,)), x.new_empty((r, x.shape[1]))


def rows_outer_dense(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
    """dW (n, in)."""
    return x.new_empty((n, x.shape[1]))
