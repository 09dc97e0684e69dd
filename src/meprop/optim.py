"""LazyAdam: Adam that updates only the rows that got a gradient.

meProp gives a layer's weight a gradient in k of its n rows. torch's ``Adam`` still reads and
writes every row of the weight and of both moments each step (its momentum moves rows that got
no gradient), so at k = n/10 the optimizer costs as much as with a dense gradient and, on a
CPU, becomes the largest part of a meProp step after the forward pass. With
``MePropConfig(sparse_grad=True)`` the weight's ``.grad`` is a row-sparse COO tensor that names
the rows; ``LazyAdam`` runs Adam's update on those rows only (one pass over k rows, a C++
kernel where meprop's kernels build, PyTorch ops elsewhere), and Adam's update on every row of
a dense gradient (biases, dense layers).

What it changes, plainly: for a row with a gradient this step, the update is torch.optim.Adam's
(same formula, bias correction from the parameter's step count, as ``torch.optim.SparseAdam``
and TensorFlow's LazyAdam). A row without one keeps its weights and both moments: torch's Adam
would decay its moments and keep moving its weights along the momentum. So LazyAdam equals
torch.optim.Adam where every row gets a gradient every step (dense gradients, k >= n), and is
another optimizer otherwise, one whose effect on accuracy is measured, not assumed
(``meprop reproduce tta``). Unlike ``torch.optim.SparseAdam`` it takes dense gradients too
(one optimizer for a whole model) and is faster than torch's fused dense Adam at meProp's k
(``benchmarks/bench_optimizer.py``).

Example:
    >>> import torch
    >>> from meprop import MePropConfig, SparseLinear, LazyAdam
    >>> layer = SparseLinear(8, 6, config=MePropConfig(k=2, mode="unified", sparse_grad=True))
    >>> opt = LazyAdam(layer.parameters(), lr=1e-2)
    >>> before = layer.weight.detach().clone()
    >>> layer(torch.randn(4, 8)).sum().backward()
    >>> opt.step()
    >>> int((layer.weight != before).any(dim=1).sum())  # only the 2 kept rows moved
    2
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import native

__all__ = ["LazyAdam"]


class LazyAdam(torch.optim.Optimizer):
    """Adam on the rows that got a gradient (row-sparse COO gradients), Adam on every entry of
    a dense gradient.

    Args:
        params: the parameters (or parameter groups) to optimize.
        lr: learning rate (torch.optim.Adam's default 1e-3).
        betas: the moments' decay rates.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (torch.optim.Adam's ``weight_decay``),
            on the rows updated this step only.

    A sparse gradient must be sparse over the first dimension only (``sparse_dim() == 1``, as
    meProp's ``sparse_grad=True`` and ``nn.Embedding(sparse=True)`` give); an uncoalesced one
    (accumulated over several backward calls) is coalesced first.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"LazyAdam: lr must be a number >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"LazyAdam: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"LazyAdam: eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"LazyAdam: weight_decay must be >= 0, got {weight_decay!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fused: dict[torch.dtype, list[Tensor]] = {}  # dense CPU gradients: torch's kernel
            others, steps = [], []  # the rest (row-sparse gradients): the row kernel
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # torch.optim.Adam's kind of step count: a float32 tensor (on the CPU) that
                    # the fused kernel reads, kept and incremented in place (no per-step tensor)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                steps.append(state["step"])
                if _FUSED and _fusable(p):
                    fused.setdefault(p.dtype, []).append(p)
                else:
                    others.append(p)
            if not steps:
                continue
            torch._foreach_add_(steps, 1)  # (one call: per-tensor adds cost more than a row step)
            for p in others:
                _update(p, self.state[p], group)
            for params in fused.values():  # (one call per dtype: the kernel takes one)
                self._fused_dense(params, group)
        return loss

    def _fused_dense(self, params: list[Tensor], group: dict) -> None:
        """torch.optim.Adam(fused=True)'s step on dense gradients (the same kernel, so the same
        result bit for bit); where this torch lacks it, the row kernel on every row."""
        states = [self.state[p] for p in params]
        b1, b2 = group["betas"]
        try:
            torch._fused_adam_(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [],
                [s["step"] for s in states], lr=group["lr"], beta1=b1,
                beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                maximize=False,
            )  # fmt: skip
        except (RuntimeError, TypeError):  # this torch's kernel refuses them: the row kernel
            for p, state in zip(params, states, strict=True):
                _update(p, state, group)


def _update(p: Tensor, state: dict, group: dict) -> None:
    g = p.grad
    if g.is_sparse:
        if g.sparse_dim() != 1:
            raise ValueError(
                f"LazyAdam: a sparse gradient must be sparse over its first dimension only "
                f"(rows), got sparse_dim={g.sparse_dim()} for a parameter of shape "
                f"{tuple(p.shape)}: use a dense gradient for it"
            )
        rows = g._indices()[0]
    else:
        rows = None
    # (n, d) views: a row of the parameter is a row of the views (a 1-d parameter: one row of
    # n entries when dense, n rows of one entry when row-sparse)
    n = p.shape[0] if p.dim() else 1
    shape = (n, p.numel() // n) if (rows is not None or p.dim() > 1) else (1, p.numel())
    m, v = state["exp_avg"], state["exp_avg_sq"]
    step = float(state["step"])  # (a CPU tensor: no device sync)
    args = (group["lr"], group["betas"], group["eps"], group["weight_decay"], step)
    native_ok = _native_ok(p, m, v, g)
    if rows is not None:
        # autograd hands a fresh gradient over marked uncoalesced; its rows, sorted and
        # distinct as meProp writes them, make it coalesced already (no sort, no copy). The
        # row kernel checks that itself and refuses other rows untouched; the PyTorch path
        # checks here. Rows that are not: coalesced first.
        if native_ok:
            values = g._values().contiguous()
            if native.row_adam(p, m, v, rows.contiguous(), values, shape[1], *args):
                return
            g = g.coalesce()
        elif not g.is_coalesced() and not bool((rows[1:] > rows[:-1]).all()):
            g = g.coalesce()
        rows, g = g._indices()[0], g._values()
    if native_ok:  # (the kernel reads pointers and sizes only: no views to build)
        rows = None if rows is None else rows.contiguous()
        native.row_adam(p, m, v, rows, g.contiguous(), shape[1], *args)
    else:
        _torch_update(p, m, v, shape, rows, g.reshape(-1, shape[1]), *args)


_NATIVE_DTYPES = (torch.float32, torch.float64)
_FUSED = hasattr(torch, "_fused_adam_")  # torch's fused Adam kernel (CPU since torch 2.4)


def _fusable(p: Tensor) -> bool:
    g = p.grad
    return (
        not g.is_sparse
        and p.device.type == "cpu"
        and p.dtype in _NATIVE_DTYPES
        and g.dtype == p.dtype
        and p.is_contiguous()
        and g.is_contiguous()
    )


def _native_ok(p: Tensor, m: Tensor, v: Tensor, g: Tensor) -> bool:
    return (
        p.device.type == "cpu"
        and p.dtype in _NATIVE_DTYPES
        and g.dtype == p.dtype
        and p.is_contiguous()
        and m.is_contiguous()
        and v.is_contiguous()
        and _native_available()
    )


def _native_available() -> bool:
    """``native.available()``, asked once per process (it is asked at every step)."""
    if not _NATIVE:
        _NATIVE.append(native.available())
    return _NATIVE[0]


_NATIVE: list[bool] = []


def _torch_update(p, m, v, shape, rows, g, lr, betas, eps, weight_decay, step) -> None:
    """The same step in PyTorch ops (any device and dtype): torch.optim.Adam's single-tensor
    formula on the selected rows, gathered and scattered back."""
    b1, b2 = betas
    step_size = lr / (1.0 - b1**step)
    bc2_sqrt = math.sqrt(1.0 - b2**step)
    p2, m2, v2 = p.reshape(shape), m.view(shape), v.view(shape)  # p2: a copy if p is strided
    if rows is None:
        pr, mr, vr = p2, m2, v2
    else:
        pr, mr, vr = p2.index_select(0, rows), m2.index_select(0, rows), v2.index_select(0, rows)
    if weight_decay:
        g = g.add(pr, alpha=weight_decay)
    mr.lerp_(g, 1.0 - b1)
    vr.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    pr.addcdiv_(mr, (vr.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
    if rows is not None:
        p2.index_copy_(0, rows, pr)
        m2.index_copy_(0, rows, mr)
        v2.index_copy_(0, rows, vr)
    if p2.data_ptr() != p.data_ptr():
        p.copy_(p2.view(p.shape))
