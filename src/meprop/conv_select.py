"""Which output channels a ``SparseConv2d`` backward keeps (``meprop.conv``), and the forms
the products, the bias, the memory and the usage record read that choice in.

For the output gradient g (B, C_out, H', W'): ``select_channels`` picks from the channel
scores (each channel's summed |g| over its positions, (B, C_out)) for ``unified`` (the same k
channels for the whole batch: ``kind="cols"``), ``per_example`` and ``random`` (each example's
k: ``kind="rows"``); ``position_keep`` picks per_position's k channels at every position
(``kind="mask"``), by a C++ kernel where it serves (``meprop.kernels.native``), else
torch.topk. NaN and inf rank highest in every mode, so non-finite gradients are kept, as the
dense backward would pass them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .adaptive import KRecord, batch_k, row_ks
from .comm import sum_over_ranks
from .config import MePropConfig
from .kernels import native

__all__ = [
    "ChannelSelection", "random_channels", "select_channels", "position_keep", "native_serves",
    "channel_scores", "channel_mask", "rows_written", "untimeable",
]  # fmt: skip


def random_channels(batch: int, channels: int, k: int, device) -> Tensor:
    """``random`` mode's draw: k distinct channels per example, (batch, k), from the global RNG
    (the k largest of batch x channels uniform keys), so ``torch.manual_seed`` reproduces it."""
    return torch.rand(batch, channels, device=device).topk(k, dim=1, sorted=False).indices


class ChannelSelection(NamedTuple):
    """What one backward kept of g (B, C_out, H', W').

    ``kind``: ``"all"`` (everything), ``"cols"`` (``index`` (k,) sorted: the same channels
    for every example), ``"rows"`` (``index`` (B, K): each example's channels; ``keep``
    (B, K) bool or None: adaptive k's entries past an example's k are False) or ``"mask"``
    (``keep`` (B, C_out, H', W') bool: per_position's k channels at each position; ``index``
    None: ``rows_written`` finds the channels kept anywhere, the rows of dW written).
    """

    kind: str
    index: Tensor | None = None
    keep: Tensor | None = None


def select_channels(s: Tensor, cfg: MePropConfig, record: KRecord | None) -> ChannelSelection:
    """The channels kept of g (B, C_out, H', W'), from its channel scores ``s`` (B, C_out), the
    sums of |g| over the positions (per_position selects from g itself: ``position_keep``)."""
    batch, c_out = s.shape
    k = cfg.k
    if k >= c_out:
        return ChannelSelection("all")
    if cfg.adapt is not None:
        record = record if record is not None else KRecord()
        if cfg.mode == "unified":
            _, cols = batch_k(channel_scores(s, cfg.scope), k, cfg.adapt, record)
            return ChannelSelection("cols", cols)
        idx, _, ks, big = row_ks(s, k, cfg.adapt, record)  # (B, K) each, K the largest k
        keep = torch.arange(big, device=s.device) < ks.unsqueeze(1)  # (B, K)
        return ChannelSelection("rows", idx, keep)
    if cfg.mode == "unified":
        # NaN scores rank highest, so NaN gradients are kept, as dense backward would pass them
        cols = channel_scores(s, cfg.scope).topk(k, sorted=False).indices.sort().values
        return ChannelSelection("cols", cols)
    if cfg.mode == "random":
        return ChannelSelection("rows", random_channels(batch, c_out, k, s.device))
    return ChannelSelection("rows", s.topk(k, dim=1, sorted=False).indices)  # (B, k)


def position_keep(g: Tensor, k: int, backend: str) -> Tensor:
    """per_position's selection: (B, C_out, H', W') bool, at each (example, position) the k
    channels of largest |g| (NaN highest, as in every mode). ``backend="auto"`` runs the C++
    kernel where it serves (float32/float64 CPU tensors, eager: 4x faster than torch.topk over
    the channel dimension, a strided one, at the ResNet's 64 and 128 channels, 17-25x at
    LeNet's 6 and 16; docs/conv.md); else torch.topk."""
    if backend == "auto" and native_serves(g):
        return native.channel_topk_mask(g, k)
    top = g.abs().topk(k, dim=1).indices  # (B, k, H', W')
    return torch.zeros(g.shape, dtype=torch.bool, device=g.device).scatter_(1, top, True)


def native_serves(g: Tensor) -> bool:
    """Whether the C++ kernels can run on ``g`` here: a float32/float64 CPU tensor outside
    torch.compile's tracing and torch.func's transforms, with the kernels built."""
    if torch.compiler.is_compiling() or untimeable(g):  # (first: tracing bans .layout)
        return False
    return native.supports(g) and native.available()


def channel_scores(s: Tensor, scope: str) -> Tensor:
    """Unified selection's (C_out,) scores: the summed |g| of each channel over the batch (and,
    with ``scope="global"``, over the ranks: every rank then keeps the same channels)."""
    return sum_over_ranks(s.sum(0)) if scope == "global" else s.sum(0)


def channel_mask(sel: ChannelSelection, batch: int, c_out: int, device) -> Tensor:
    """The selection as a bool mask that broadcasts over g (B, C_out, H', W'): (1, C_out, 1, 1)
    for ``cols``, (B, C_out, 1, 1) for ``rows``, (B, C_out, H', W') for ``mask``."""
    if sel.kind == "mask":
        return sel.keep
    if sel.kind == "cols":
        mask = torch.zeros(1, c_out, dtype=torch.bool, device=device).index_fill_(
            1, sel.index, True
        )
        return mask[:, :, None, None]
    src = sel.keep if sel.keep is not None else torch.ones_like(sel.index, dtype=torch.bool)
    mask = torch.zeros(batch, c_out, dtype=torch.bool, device=device).scatter_(1, sel.index, src)
    return mask[:, :, None, None]


def untimeable(g: Tensor) -> bool:
    """Tensors the timing cannot run on: meta tensors, or while a torch.func transform runs."""
    return g.is_meta or torch._C._are_functorch_transforms_active()


def rows_written(sel: ChannelSelection, c_out: int, device) -> Tensor:
    """The output channels a selection kept anywhere (the rows of dW it writes), sorted."""
    if sel.kind == "all":
        return torch.arange(c_out, device=device)
    if sel.kind == "cols":
        return sel.index
    if sel.kind == "mask":
        return sel.keep.any(dim=(0, 2, 3)).nonzero().flatten()
    return sel.index.reshape(-1).unique()
