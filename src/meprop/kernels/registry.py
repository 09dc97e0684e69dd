"""The CPU kernels as torch custom ops: ``torch.ops.meprop.<name>``, for torch.compile.

``topk_rows``, ``rows_matmul``, ``rows_outer`` and ``rows_outer_dense`` (semantics in
``meprop.kernels.cpu``) are registered with ``torch.library.custom_op`` and a fake
implementation, so ``torch.compile`` traces through them (rows_outer's R is data-dependent).
No autograd formulas: these are the backward. The CPU implementation is the C++ kernels of
``meprop.kernels.native`` where they build, else the numba ones. Eager code calls those
modules' functions directly: the dispatcher costs microseconds per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu, fakes, native

__all__ = ["implementation"]


def implementation():
    """The module that runs the ops: ``native`` (C++) where available, else ``cpu`` (numba)."""
    return native if native.available() else cpu


def _topk_rows(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return implementation().topk_rows(g, k)


def _rows_matmul(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    return implementation().rows_matmul(idx, vals, weight)


def _rows_outer(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    rows, dw_rows = implementation().rows_outer(idx, vals, x, n)
    # Outputs must not be views of larger buffers: copy where rows_outer sliced one.
    if dw_rows._base is not None:
        rows, dw_rows = rows.clone(), dw_rows.clone()
    return rows, dw_rows


def _rows_outer_dense(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
    return implementation().rows_outer_dense(idx, vals, x, n)


_topk_rows_op = torch.library.custom_op(
    "meprop::topk_rows", _topk_rows, mutates_args=(), device_types="cpu"
)
_rows_matmul_op = torch.library.custom_op(
    "meprop::rows_matmul", _rows_matmul, mutates_args=(), device_types="cpu"
)
_rows_outer_op = torch.library.custom_op(
    "meprop::rows_outer", _rows_outer, mutates_args=(), device_types="cpu"
)
_rows_outer_dense_op = torch.library.custom_op(
    "meprop::rows_outer_dense", _rows_outer_dense, mutates_args=(), device_types="cpu"
)


for _op, _fake in (
    (_topk_rows_op, fakes.topk_rows),
    (_rows_matmul_op, fakes.rows_matmul),
    (_rows_outer_op, fakes.rows_outer),
    (_rows_outer_dense_op, fakes.rows_outer_dense),
):
    _op.register_fake(_fake)
