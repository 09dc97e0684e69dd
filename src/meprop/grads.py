"""Row-sparse weight gradients (``MePropConfig(sparse_grad=True)``): a gradient-clipping helper.

With ``sparse_grad=True`` a layer's ``weight.grad`` is a sparse COO tensor holding only the
rows that meProp touched (``nn.Embedding(sparse=True)`` does the same). What takes it, on
torch 2.x:

* optimizers: ``SGD`` (with or without momentum), ``Adagrad`` and ``SparseAdam`` (lazy: only
  the touched rows' moments and weights change). ``Adam``, ``AdamW`` and ``RMSprop`` raise
  ``RuntimeError: ... does not support sparse gradients``: use ``SparseAdam`` for the sparse
  weights and ``Adam`` for the rest (two optimizers), or ``sparse_grad=False``.
* weight decay: ``Adagrad(weight_decay>0)`` raises ``weight_decay option is not compatible with
  sparse gradients``; ``SGD(weight_decay>0)`` raises ``add(sparse, dense) is not supported``.
  Put the sparse weights in a parameter group without weight decay.
* accumulation over several backward calls: works (the sum of sparse tensors is sparse, with
  repeated rows until coalesced); a dense ``.grad`` that already exists stays dense.
* ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` raise ``NotImplementedError`` for
  the sparse backend; ``meprop.clip_grad_norm_`` below takes both kinds.
* torch's ``DistributedDataParallel`` puts them in a dense bucket and fails in backward
  ("Cannot access storage of SparseTensorImpl"); ``check_not_in_plain_ddp`` says so in forward,
  and ``meprop.distributed.wrap`` is the DDP that takes them (gloo).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

__all__ = ["clip_grad_norm_", "weight_grad", "lazy_zeros", "check_not_in_plain_ddp"]


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients that may be row-sparse (COO).

    Sparse gradients are coalesced first (repeated rows summed, and ``p.grad`` replaced by the
    coalesced tensor), so the norm is that of the dense gradient. Returns the total norm.

    Example:
        >>> from meprop import MePropConfig, SparseLinear
        >>> layer = SparseLinear(8, 6, config=MePropConfig(k=2, sparse_grad=True))
        >>> layer(torch.randn(4, 8)).sum().backward()
        >>> norm = clip_grad_norm_(layer.parameters(), max_norm=0.1)
        >>> bool(layer.weight.grad.is_sparse)
        True
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norms = []
    for p in params:
        g = p.grad
        if g.is_sparse:
            g = p.grad = g.coalesce()
            g = g._values()
        norms.append(torch.linalg.vector_norm(g, norm_type))
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({total}); "
            "pass error_if_nonfinite=False to clip anyway"
        )
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        g = p.grad._values() if p.grad.is_sparse else p.grad
        g.mul_(coef.to(g.device))
    return total


def weight_grad(rows: Tensor, dw_rows: Tensor, n: int, sparse: bool) -> Tensor:
    """dW (n, ...) from its non-zero rows ``dw_rows`` (R, ...) at ``rows`` (R,): row-sparse COO
    (sparse over the first dimension, dense over the rest), or a dense tensor with zero rows.
    A linear layer's dW is (n, in); a convolution's (C_out, C_in / groups, kh, kw)."""
    if sparse:
        if torch.compiler.is_compiling():
            return _row_sparse_untraced(rows, dw_rows, n)
        return _row_sparse(rows, dw_rows, n)
    if dw_rows.dim() == 2:
        dw = lazy_zeros(n, dw_rows.shape[1], dw_rows)
    else:
        dw = dw_rows.new_zeros((n, *dw_rows.shape[1:]))
    return dw.index_copy_(0, rows, dw_rows)


def _row_sparse(rows: Tensor, dw_rows: Tensor, n: int) -> Tensor:
    # rows are sorted and distinct, so the tensor is already coalesced.
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0),
        dw_rows,
        (n, *dw_rows.shape[1:]),
        is_coalesced=True,
        check_invariants=False,
    )


# torch.compile cannot trace sparse COO tensors: the layer's backward runs eagerly (a graph
# break at its autograd.Function), and fullgraph=True stops with this reason.
_row_sparse_untraced = torch.compiler.disable(
    _row_sparse,
    reason=(
        "meProp's sparse_grad=True builds a row-sparse COO weight gradient, which torch.compile "
        "cannot trace: use MePropConfig(sparse_grad=False) with fullgraph=True, or compile "
        "without fullgraph (the layer's backward then runs eagerly)"
    ),
)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def lazy_zeros(n: int, d: int, like: Tensor) -> Tensor:
    """A zero (n, d) tensor whose untouched pages cost nothing.

    torch.zeros writes every byte; numpy's zeros comes from calloc, whose large blocks are
    fresh zero pages that the kernel maps on first write. A row-sparse dW touches k of n rows,
    so for a 4096 x 4096 float32 gradient this skips writing ~64 MB per backward.
    """
    if like.device.type != "cpu" or like.dtype not in _NUMPY_DTYPES or n * d < (1 << 20):
        return like.new_zeros(n, d)
    return torch.from_numpy(np.zeros((n, d), dtype=_NUMPY_DTYPES[like.dtype]))


def check_not_in_plain_ddp(layer: str) -> None:
    """Raise where ``layer`` (a meProp layer with ``sparse_grad=True``) runs inside torch's own
    ``DistributedDataParallel`` forward, whose reducer would fail in backward on the row-sparse
    weight gradient. ``meprop.distributed.MePropDDP`` (marked by ``_meprop_sparse``) takes it."""
    if torch.compiler.is_compiling():
        return
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is not None and not hasattr(ddp, "_meprop_sparse"):
        raise RuntimeError(
            f"{layer} has sparse_grad=True and runs inside torch's DistributedDataParallel, "
            "whose reducer cannot take row-sparse gradients (it would fail in backward with "
            "'Cannot access storage of SparseTensorImpl'): wrap the model with "
            "meprop.distributed.wrap(model) (a gloo process group), or use "
            "MePropConfig(sparse_grad=False)"
        )
