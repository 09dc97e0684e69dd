"""meAct: minimal effort activation, the analysis method of the extended meProp paper.

Sun, Ren, Ma, Wei, Li, Wang, "Training Simplification and Model Simplification for Deep
Learning: A Minimal Effort Back Propagation Method" (TKDE; arXiv 1711.06528). Hypothesis: each
example needs only a few neurons, and normal training keeps moving parameters to fit noise.
The rule, per training example e and hidden layer (a linear map ``z = W x + b``):

    A[e, j] += |dL/dz_j|                      at every pass over e (accumulated gradients)
    active(e) = { j : A[e, j] >= threshold% * sum_j' A[e, j'] }   (optionally the top ``cap``)

From the start epoch on, the forward pass over e computes only z_j for j in active(e); every
other z_j is the value it had at e's last pass (a per-example cache), and gets no gradient
(so A grows only at active neurons). At test time (``model.eval()``) the forward is normal.

State per layer, on the layer's device: the accumulations stored as *shares* of their row's
total (``share`` (N, n), so float16 holds them at any loss scale, with ``total`` (N,) float32),
and the cached outputs (``cache`` (N, n)); N examples, n neurons. float16 by default:
4 N n bytes per layer (+ 4 N), i.e. 220 MB for MNIST's 55,000 x (500 + 500).

The forward of the active entries runs per-example sparse kernels
(``meprop.kernels.meact_kernels``: O(active x in) per example, not a dense matmul then a mask) and so
does its backward; ``reference_active_linear`` is the obviously-right dense version.

Hooking it into a loop: build ``MeAct(model, config, num_examples)`` (it swaps the chosen
``nn.Linear`` layers for ``ActiveLinear`` in place, keeping their Parameters), call
``set_epoch(epoch)`` each epoch and run each training forward inside ``with meact.batch(ids):``
where ``ids`` are the batch's example numbers (``IndexedBatch`` carries them for our tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MeActConfig
from .convert import hidden_layers

__all__ = [
    "MeAct",
    "ActiveLinear",
    "IndexedBatch",
    "active_mask",
    "active_linear",
    "reference_active_linear",
]

FilterFn = Callable[[nn.Module, str], bool]


# --------------------------------------------------------------------------------------------
# The active set


def active_mask(acc: Tensor, threshold: float, cap: int = 0) -> Tensor:
    """Which neurons are active, from accumulated absolute gradients.

    Args:
        acc: (B, n) non-negative accumulations (any scale: only each row's shares matter).
        threshold: least share of the row's total, in percent.
        cap: keep at most this many per row, the largest shares (ties: torch.topk's pick);
            0: no cap.

    Returns:
        (B, n) bool. A row whose total is zero (nothing accumulated yet) is all active, cap or
        not: there is nothing to choose by.

    Example:
        >>> active_mask(torch.tensor([[6.0, 3.0, 1.0, 0.0]]), threshold=10.0)
        tensor([[ True,  True,  True, False]])
        >>> active_mask(torch.tensor([[6.0, 3.0, 1.0, 0.0]]), threshold=10.0, cap=1)
        tensor([[ True, False, False, False]])
    """
    total = acc.sum(1, keepdim=True)  # (B, 1)
    # share >= threshold%, as products (exact at the boundary for round numbers); a row with
    # nothing accumulated passes everywhere (0 >= 0).
    mask = acc * 100.0 >= total * threshold
    n = acc.shape[1]
    if 0 < cap < n:
        top = acc.masked_fill(~mask, -1.0).topk(cap, dim=1, sorted=False).indices  # (B, cap)
        keep = torch.zeros_like(mask).scatter_(1, top, True)
        mask &= keep | (total == 0)
    return mask


# --------------------------------------------------------------------------------------------
# The active-only linear map


def reference_active_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, base: Tensor
) -> Tensor:
    """The obviously-right version: the dense output where ``mask``, ``base`` elsewhere.

    Autograd through ``torch.where`` gives the inactive entries zero gradient. x (B, in),
    weight (n, in), mask and base (B, n).
    """
    return torch.where(mask, F.linear(x, weight, bias), base)


def _csr(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The active sets of mask (B, n) as offsets (B + 1,) and cols (nnz,), rows in order."""
    offsets = mask.new_zeros(mask.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(mask.sum(1), 0, out=offsets[1:])
    return offsets, mask.nonzero(as_tuple=True)[1]


class _ActiveLinearFn(torch.autograd.Function):
    """out = base with the active entries replaced by x W^T + b; gradients from those only."""

    # (forward with ctx, not setup_context: Function.apply then skips an inspect.signature
    # bind per call, ~50 us here)
    @staticmethod
    def forward(ctx, x, weight, bias, offsets, cols, base):
        from .kernels import meact_kernels as active

        ctx.save_for_backward(x, weight, offsets, cols)
        ctx.has_bias = bias is not None
        return active.active_linear(x, weight, bias, offsets, cols, base)

    @staticmethod
    def backward(ctx, grad):
        from .kernels import meact_kernels as active

        x, weight, offsets, cols = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = active.active_linear_dx(offsets, cols, grad, weight)
        if need_w or need_b:
            dw, db = active.active_linear_dw(offsets, cols, grad, x)
        return dx, dw if need_w else None, db if need_b else None, None, None, None


def _kernels_apply(*tensors: Tensor) -> bool:
    from .kernels import meact_kernels as active

    return active.available() and all(
        t.is_cpu and t.dtype in (torch.float32, torch.float64) and t.layout == torch.strided
        for t in tensors
    )


def active_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor,
    base: Tensor,
    backend: str = "auto",
) -> Tensor:
    """``where(mask, x @ weight.T + bias, base)``, computing only the entries in ``mask``.

    Args:
        x: (B, in). weight: (n, in). bias: (n,) or None.
        mask: (B, n) bool, the active entries. base: (B, n), the values elsewhere (no
            gradient flows into it).
        backend: ``"auto"`` (the compiled kernels for float32/float64 CPU tensors, else the
            reference), ``"numba"`` (the kernels; an error where they do not apply) or
            ``"torch"`` (the reference: a dense matmul, then the mask).

    Returns:
        (B, n). Gradients reach x, weight and bias from the active entries only.

    Example:
        >>> x, w = torch.ones(1, 2), torch.ones(3, 2)
        >>> active_linear(x, w, None, torch.tensor([[True, False, True]]), torch.zeros(1, 3))
        tensor([[2., 0., 2.]])
    """
    if x.dim() != 2 or mask.shape != base.shape or mask.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(
            f"want x (B, in), weight (n, in), mask and base (B, n); got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, mask {tuple(mask.shape)}, base {tuple(base.shape)}"
        )
    operands = (x, weight, base) if bias is None else (x, weight, base, bias)
    kernels = backend != "torch" and _kernels_apply(*operands)
    if backend == "numba" and not kernels:
        raise ValueError(
            f"backend='numba' needs float32/float64 CPU tensors and numba, got {x.dtype} on "
            f"{x.device}: use backend='auto'"
        )
    if not kernels:
        return reference_active_linear(x, weight, bias, mask, base)
    base = base.to(x.dtype)
    offsets, cols = _csr(mask)
    return _ActiveLinearFn.apply(x, weight, bias, offsets, cols, base)


# --------------------------------------------------------------------------------------------
# Batches that carry their examples' numbers


class IndexedBatch(tuple):
    """A mini-batch tuple (e.g. ``(x, y)``) that also carries ``ids``: the examples'
    positions in their split, (B,) int64. It unpacks like the plain tuple."""

    ids: Tensor

    def __new__(cls, items, ids: Tensor):
        self = super().__new__(cls, items)
        self.ids = ids
        return self


# --------------------------------------------------------------------------------------------
# The module and the per-example state


class ActiveLinear(nn.Linear):
    """An ``nn.Linear`` driven by a ``MeAct``: in training, active-only outputs per example.

    Made by ``MeAct`` (which swaps the class of an existing ``nn.Linear``, keeping its
    Parameters); in eval mode it is exactly ``nn.Linear``.
    """

    meact: MeAct
    meact_name: str

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return F.linear(input, self.weight, self.bias)
        return self.meact._forward(self, input)

    def extra_repr(self) -> str:
        c = self.meact.config
        cap = f", cap={c.cap}" if c.cap else ""
        return f"{super().extra_repr()}, meact_threshold={c.threshold}%{cap}"


@dataclass
class _LayerState:
    share: Tensor  # (N, n) storage dtype: accumulated |dL/dz| as shares of the row's total
    total: Tensor  # (N,) float32: each row's total
    cache: Tensor  # (N, n) storage dtype: each example's outputs at its last pass
    active: Tensor  # () float64: active neurons summed over examples since the last read
    rows: int = 0  # examples counted in ``active``


class MeAct:
    """meAct on the chosen ``nn.Linear`` layers of a model, with its per-example state.

    Args:
        model: the model; its ``nn.Linear`` layers that pass ``filter_fn`` become
            ``ActiveLinear`` in place (same Parameters: an optimizer built before still works).
        config: a ``MeActConfig``.
        num_examples: N, the number of training examples (ids run over [0, N)).
        filter_fn: ``filter_fn(module, name) -> bool``; default ``hidden_layers(model)`` (all
            but the last ``nn.Linear``: the paper's hidden layers).

    Memory: ``memory_bytes()``; see the module docstring.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> meact = MeAct(model, MeActConfig(start_epoch=1, threshold=5.0), num_examples=10)
        >>> x, y, ids = torch.randn(10, 4), torch.randint(0, 2, (10,)), torch.arange(10)
        >>> for epoch in range(2):
        ...     meact.set_epoch(epoch)
        ...     with meact.batch(ids):  # the batch's example numbers
        ...         loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> list(meact.read_active())  # mean active neurons per example, per layer
        ['0']
    """

    def __init__(
        self,
        model: nn.Module,
        config: MeActConfig,
        num_examples: int,
        filter_fn: FilterFn | None = None,
    ) -> None:
        if not isinstance(config, MeActConfig):
            raise TypeError(f"config must be a MeActConfig, got {type(config).__name__}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
        self.config = config
        self.num_examples = num_examples
        self.epoch = 0
        self._ids: Tensor | None = None
        filter_fn = filter_fn or hidden_layers(model)
        dtype = getattr(torch, config.storage)
        self.layers: dict[str, ActiveLinear] = {}
        self._state: dict[str, _LayerState] = {}
        for name, module in model.named_modules():
            if type(module) is not nn.Linear or not filter_fn(module, name):
                continue
            n, dev = module.out_features, module.weight.device
            self._state[name] = _LayerState(
                share=torch.zeros(num_examples, n, dtype=dtype, device=dev),
                total=torch.zeros(num_examples, dtype=torch.float32, device=dev),
                cache=torch.zeros(num_examples, n, dtype=dtype, device=dev),
                active=torch.zeros((), dtype=torch.float64, device=dev),
            )
            module.__class__ = ActiveLinear
            module.meact, module.meact_name = self, name
            self.layers[name] = module
        if not self.layers:
            raise ValueError(
                "no nn.Linear layer of the model passed filter_fn: meAct needs at least one "
                "(exact nn.Linear; convert meProp's SparseLinear back with densify_ first)"
            )

    # -- the loop's side ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Tell meAct the current epoch (counting from 0); it applies from ``start_epoch``."""
        self.epoch = int(epoch)

    @property
    def applies(self) -> bool:
        """Whether training forwards use the active sets now (epoch >= start_epoch)."""
        return self.epoch >= self.config.start_epoch

    @contextmanager
    def batch(self, ids: Tensor) -> Iterator[None]:
        """Run the training forward of the examples ``ids`` (B,) inside this context.

        ``ids`` are distinct example numbers in [0, num_examples); row b of the batch is
        example ids[b]. The backward may run after the context closes.
        """
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.int64:
            raise TypeError(f"ids must be a 1-D int64 tensor of example numbers, got {ids!r}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_examples:
                raise IndexError(
                    f"example ids must be in [0, {self.num_examples}), got {lo}..{hi}: is "
                    "num_examples the size of the training split?"
                )
            if torch.unique(ids).numel() != ids.numel():
                raise ValueError("example ids in one batch must be distinct")
        self._ids = ids
        try:
            yield
        finally:
            self._ids = None

    def read_active(self) -> dict[str, float]:
        """Mean active neurons per example, per layer, over the meAct forwards since the last
        call (layers with none are left out); resets the counts. One host sync per layer."""
        out = {}
        for name, st in self._state.items():
            if st.rows:
                out[name] = float(st.active) / st.rows
            st.active.zero_()
            st.rows = 0
        return out

    def memory_bytes(self) -> int:
        """Bytes of per-example state (shares, totals and cached outputs of every layer)."""
        return sum(
            t.numel() * t.element_size()
            for st in self._state.values()
            for t in (st.share, st.total, st.cache)
        )

    def remove(self) -> None:
        """Turn the layers back into ``nn.Linear`` and drop the state."""
        for module in self.layers.values():
            module.__class__ = nn.Linear
            del module.meact, module.meact_name
        self.layers.clear()
        self._state.clear()

    def state_dict(self) -> dict:
        """The per-example state and the epoch (for checkpoints; large: see memory_bytes)."""
        return {
            "config": self.config.to_dict(),
            "num_examples": self.num_examples,
            "epoch": self.epoch,
            "layers": {
                name: {"share": st.share, "total": st.total, "cache": st.cache}
                for name, st in self._state.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != self.num_examples or set(state["layers"]) != set(self._state):
            raise ValueError(
                f"meAct state for {state['num_examples']} examples and layers "
                f"{sorted(state['layers'])} does not fit {self.num_examples} examples and "
                f"layers {sorted(self._state)}"
            )
        for name, st in self._state.items():
            saved = state["layers"][name]
            for key in ("share", "total", "cache"):
                getattr(st, key).copy_(saved[key])
        self.epoch = int(state["epoch"])

    # -- the layers' side -------------------------------------------------------------------

    def _forward(self, module: ActiveLinear, x: Tensor) -> Tensor:
        ids = self._ids
        if ids is None:
            raise RuntimeError(
                "an ActiveLinear ran a training forward outside `with meact.batch(ids):`: "
                "meAct needs the batch's example numbers (or call model.eval() for a normal "
                "forward)"
            )
        if x.dim() != 2 or x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"meAct layer {module.meact_name!r} got input {tuple(x.shape)} for "
                f"{ids.shape[0]} example ids: want (B, in) with one row per example"
            )
        st = self._state[module.meact_name]
        ids = ids.to(st.total.device)
        active = None  # the active sets: None (all), a (B, n) mask, or CSR (offsets, cols)
        if not self.applies:  # normal training (exactly nn.Linear), accumulating gradients
            out = F.linear(x, module.weight, module.bias)
        else:
            share = st.share.index_select(0, ids).float()  # (B, n)
            base = st.cache.index_select(0, ids).to(x.dtype)  # (B, n): outputs at the last pass
            w, b = module.weight, module.bias
            if self._kernels(x, w, b):  # CSR all the way: no (B, n) boolean masks
                from .kernels import meact_kernels as kernels

                active = kernels.select_active(share, self.config.threshold, self.config.cap)
                out = _ActiveLinearFn.apply(x, w, b, *active, base)
                st.active += active[1].numel()
            else:
                active = active_mask(share, self.config.threshold, self.config.cap)
                out = reference_active_linear(x, w, b, active, base)
                st.active += active.sum()  # stays on the device: read once per epoch
            st.rows += x.shape[0]
        st.cache.index_copy_(0, ids, out.detach().to(st.cache.dtype))
        if out.requires_grad:
            out.register_hook(partial(_accumulate, st, ids, active))
        return out

    def _kernels(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        """Whether this forward runs the compiled kernels (per the backend setting)."""
        if self.config.backend == "torch":
            return False
        ok = _kernels_apply(x, weight, *(() if bias is None else (bias,)))
        if self.config.backend == "numba" and not ok:
            raise ValueError(
                f"backend='numba' needs float32/float64 CPU tensors and numba, got {x.dtype} on "
                f"{x.device}: use backend='auto'"
            )
        return ok


@torch.no_grad()
def _accumulate(
    st: _LayerState, ids: Tensor, active: Tensor | tuple[Tensor, Tensor] | None, grad: Tensor
) -> None:
    """Add |grad| (B, n) (at the active entries) to the examples' accumulations, as shares.

    With T the old total and s the new gradients' sum: share' = (share T + |g|) / (T + s).
    Inactive neurons get no gradient, so nothing is added there.
    """
    old = st.total.index_select(0, ids)  # (B,)
    share = st.share.index_select(0, ids).float()  # (B, n)
    if isinstance(active, tuple):  # CSR: the compiled kernel reads the active entries only
        from .kernels import meact_kernels as kernels

        share, new = kernels.accumulate_active(share, old, grad.detach(), *active)
    else:
        a = grad.detach().abs().float()
        if active is not None:
            a.masked_fill_(~active, 0.0)
        new = old + a.sum(1)
        share = (share * old[:, None] + a) / new.clamp_min(1e-30)[:, None]
    st.share.index_copy_(0, ids, share.to(st.share.dtype))
    st.total.index_copy_(0, ids, new)
