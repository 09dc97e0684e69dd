"""meProp for convolutions: ``SparseConv2d``, an ``nn.Conv2d`` whose backward keeps only the
output channels with the largest gradients.

Wei, Sun, Ren, Xu, "Minimal Effort Back Propagation for Convolutional Neural Networks" (arXiv
1709.05804) carry meProp's top-k from linear maps to convolutions. A convolution is one linear
map applied at every output position (im2col: a GEMM whose rows are the filters), so its meProp
unit is an output channel, one filter. For x (B, C_in, H, W), weight (C_out, C_in / groups, kh,
kw) and the output gradient g = dL/dy (B, C_out, H', W'), a channel's score is its summed |g|
over the positions (and the batch, for ``unified``):

* ``unified``: the k channels with the largest sum of |g| over batch and positions, the same
  for every example. Backward runs on those k channels compacted: one dense convolution
  backward on ``g[:, idx]`` and ``weight[idx]``, so it costs about k / C_out of the dense one.
* ``per_example``: for each example the k channels with the largest sum of |g| over its
  positions (g masked per example). Backward runs each example on its own k channels, compacted
  into one grouped convolution (the batch folded into the groups), so it too costs about
  k / C_out of the dense one, whatever the union of the selected channels.
* ``random``: k channels drawn uniformly per example (the paper's control), computed as
  ``per_example``.
* ``per_position``: at each output position of each example, the k channels with the largest
  |g| (top-k of each row of the im2col gradient matrix). No compaction: the masked g through
  the full backward, at dense cost, plus the selection (``position_keep``: a C++ kernel under
  ``backend="auto"``, else torch.topk).

``symmetric`` has no channel form (a channel's score is a magnitude, without sign) and is
refused. The paper's own selection could not be checked against its text here (only its
abstract and introduction were at hand), so no mode claims to be it.

The selection itself (the channels kept, in the forms the products read) is
``meprop.conv_select``'s. Every mode's result is exactly the dense backward of the masked g
(what ``meprop.reference.reference_conv2d_backward`` computes); only where the work is done
differs.
``backend`` picks how: ``"torch"`` the compacted convolutions above, ``"masked"`` the masked g
through the full convolution backward, ``"auto"`` the fastest for the call's shape of those
and, for stride-1, dilation-1, groups-1 convolutions, a C++ kernel that runs each example's
kept channels over whole padded images without a patch matrix (``native.conv_rows``; pinned
with ``MEPROP_BACKEND=native``), timed on first use and cached (``meprop.kernels.dispatch``;
``MEPROP_AUTOTUNE=0``: compacted; large layers keeping at most a quarter of their channels:
the masked form is not timed).

Groups: with ``groups > 1`` (depthwise included) the selected channels are compacted too, each
one its own group over the input channels of its original group (gathered from x), so the
gradients stay exact for the masked g.

meSimp (``meprop.simplify``) removes whole filters from the usage record and slices the next
layer's input channels (groups=1 only). Not done here: the ``native``, ``numba`` and
``triton`` backends as a config's ``backend`` (refused: ``auto`` runs the C++ kernel where it
serves), and adaptive k and memory under torch.compile, which are refused by name, as is
``sparse_grad=True`` under DistributedDataParallel.

Memorized back-propagation (``memory``): as ``SparseLinear``'s, with the memory a
(C_out, H', W') tensor (the mean over the batch of what the channel selection dropped, times
the ratio) added to every example's output gradient before the selection; it restarts where
the output's shape, dtype or device changes.

Several processes: ``scope="global"`` sums unified selection's channel scores over the ranks
(one all-reduce of C_out numbers per layer and step), so every rank keeps the channels of the
global batch; the compacted all-reduce of ``meprop.distributed`` then sends those k channels'
dW rows only (``meprop.ddp_hook``; with ``scope="local"`` the ranks' channels are united).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .adaptive import KRecord, score_dtype
from .config import MePropConfig
from .conv_select import (
    ChannelSelection,
    channel_mask,
    native_serves,
    position_keep,
    random_channels,
    rows_written,
    select_channels,
    untimeable,
)
from .grads import weight_grad
from .kernels import dispatch, native
from .nn import config_repr
from .ops import ROWS_ATTR, apply_autocast, builds_graph

__all__ = ["SparseConv2d", "check_conv_config", "random_channels"]

_conv_backward = torch.ops.aten.convolution_backward

CONV_BACKENDS = ("auto", "torch", "masked")


def check_conv_config(config: MePropConfig) -> None:
    """Raise for settings ``SparseConv2d`` cannot serve, naming the setting and the fix."""
    if config.mode == "symmetric":
        raise ValueError(
            "SparseConv2d selects output channels by their summed |g|, which has no sign: "
            "mode='symmetric' has no channel form; use mode='per_example', 'unified' or "
            "'random' (or leave the Conv2d layers dense with filter_fn)"
        )
    if config.backend not in CONV_BACKENDS:
        raise ValueError(
            f"SparseConv2d runs PyTorch's convolutions: backend must be one of {CONV_BACKENDS}, "
            f"got {config.backend!r} (the compiled kernels are for linear layers); give the "
            "Conv2d layers their own config with filter_fn"
        )


class Geometry(NamedTuple):
    """The convolution's numeric settings (padding already numeric: strings and non-zero
    padding modes are resolved before the autograd Function)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


# --------------------------------------------------------------------------------------------
# Backward products: (dx or None, dW (C_out, C_in / groups, kh, kw) or None)


def _backward(g, x, weight, geo: Geometry, groups: int, need_dx, need_dw, dx_cl=False):
    """dx and dW of one convolution; with ``dx_cl``, dx in a call of its own on channels_last
    tensors (the input's values are not read: an empty one of its shape serves), returned in
    x's layout. That needs none of oneDNN's reorder buffers: 2x faster for some compacted
    shapes where fresh buffers page-fault, slower for others (``auto`` times both)."""
    cb = _conv_backward
    args = (geo.stride, geo.padding, geo.dilation, False, (0, 0), groups)
    if not (dx_cl and need_dx):
        dx, dw, _ = cb(g, x, weight, None, *args, (need_dx, need_dw, False))
        return dx, dw
    dw = cb(g, x, weight, None, *args, (False, True, False))[1] if need_dw else None
    cl = torch.channels_last
    shape_of_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=cl)
    gc, wc = g.contiguous(memory_format=cl), weight.contiguous(memory_format=cl)
    dx = cb(gc, shape_of_x, wc, None, *args, (True, False, False))[0]
    x_cl = x.is_contiguous(memory_format=cl) and not x.is_contiguous()
    return dx.contiguous(memory_format=cl if x_cl else torch.contiguous_format), dw


def _impl_masked(g, x, weight, sel, geo, need_dx, need_dw):
    """Mask g to the selection, then the full convolution backward."""
    if sel.kind == "all":
        return _backward(g, x, weight, geo, geo.groups, need_dx, need_dw)
    mask = channel_mask(sel, g.shape[0], g.shape[1], g.device)
    # A product, 10x faster than masked_fill here. It differs only where a dropped channel
    # holds a NaN or inf: NaN and inf score highest, so that happens only where k non-finite
    # channels were kept, whose products are not finite either.
    gm = g * mask  # (bool promotes within the product: no float copy of a full-size mask)
    return _backward(gm, x, weight, geo, geo.groups, need_dx, need_dw)


def _group_inputs(chans: Tensor, weight: Tensor, groups: int, c_in: int) -> Tensor:
    """The input channels each output channel in ``chans`` (...) reads: (..., C_in / groups)."""
    per_group = weight.shape[0] // groups  # output channels per group
    cin_g = c_in // groups
    first = (chans // per_group) * cin_g
    return first.unsqueeze(-1) + torch.arange(cin_g, device=chans.device)


def _impl_compact(g, x, weight, sel, geo, need_dx, need_dw, dx_cl=False):
    """The convolution backward on the selected channels only (see the module docstring)."""
    if sel.kind == "all":
        return _backward(g, x, weight, geo, geo.groups, need_dx, need_dw)
    batch, c_in, h, w = x.shape
    _, _, ho, wo = g.shape
    groups = geo.groups
    if sel.kind == "cols":
        idx = sel.index  # (k,)
        k = idx.shape[0]
        gs = g.index_select(1, idx)  # (B, k, H', W')
        ws = weight.index_select(0, idx)  # (k, C_in / groups, kh, kw)
        if groups == 1:
            dx, dws = _backward(gs, x, ws, geo, 1, need_dx, need_dw, dx_cl)
        else:  # each selected channel its own group over its group's inputs
            in_ch = _group_inputs(idx, weight, groups, c_in).reshape(-1)  # (k * C_in/groups,)
            dxs, dws = _backward(gs, x.index_select(1, in_ch), ws, geo, k, need_dx, need_dw, dx_cl)
            dx = x.new_zeros(x.shape).index_add_(1, in_ch, dxs) if need_dx else None
        dw = weight.new_zeros(weight.shape).index_copy_(0, idx, dws) if need_dw else None
        return dx, dw
    # rows: each example on its own K channels, the batch folded into the groups
    if batch == 0 or sel.kind == "mask":  # (no groups to fold into; per_position: no compaction)
        return _impl_masked(g, x, weight, sel, geo, need_dx, need_dw)
    idx = sel.index  # (B, K)
    kk = idx.shape[1]
    gs = g.gather(1, idx[:, :, None, None].expand(batch, kk, ho, wo))  # (B, K, H', W')
    if sel.keep is not None:
        gs = gs.masked_fill(~sel.keep[:, :, None, None], 0)
    gs = gs.reshape(1, batch * kk, ho, wo)
    flat = idx.reshape(-1)  # (B*K,)
    ws = weight.index_select(0, flat)  # (B*K, C_in / groups, kh, kw)
    xb = x.reshape(1, batch * c_in, h, w)
    if groups == 1:  # group b: example b's K channels over its C_in inputs
        dxs, dws = _backward(gs, xb, ws, geo, batch, need_dx, need_dw, dx_cl)
        dx = dxs.reshape(x.shape) if need_dx else None
    else:  # group (b, j): example b's j-th channel over its group's inputs
        offsets = torch.arange(batch, device=idx.device).unsqueeze(1) * c_in  # (B, 1)
        in_ch = (_group_inputs(idx, weight, groups, c_in) + offsets.unsqueeze(2)).reshape(-1)
        xs = xb.index_select(1, in_ch)
        dxs, dws = _backward(gs, xs, ws, geo, batch * kk, need_dx, need_dw, dx_cl)
        dx = xb.new_zeros(xb.shape).index_add_(1, in_ch, dxs).reshape(x.shape) if need_dx else None
    dw = weight.new_zeros(weight.shape).index_add_(0, flat, dws) if need_dw else None
    return dx, dw


def _impl_compact_cl(g, x, weight, sel, geo, need_dx, need_dw):
    """``_impl_compact`` with dx computed on channels_last tensors (``_backward``)."""
    return _impl_compact(g, x, weight, sel, geo, need_dx, need_dw, dx_cl=True)


def _direct_serves(sel: ChannelSelection, g: Tensor, x: Tensor, weight: Tensor, geo) -> bool:
    """Whether ``_impl_direct`` can run this call: channel lists (unified, per example), a
    stride-1, dilation-1, groups-1 convolution, float32/float64 CPU tensors, eager, with the C++
    kernels built."""
    return (
        sel.kind in ("cols", "rows")
        and geo.stride == (1, 1) and geo.dilation == (1, 1) and geo.groups == 1
        and x.dtype == weight.dtype == g.dtype and native_serves(g)
    )  # fmt: skip


def _impl_direct(g, x, weight, sel, geo, need_dx, need_dw):
    """Each example's kept channels through the C++ kernel (``native.conv_rows``): every
    product runs over a whole padded image as one flat vector, at K / C_out of the dense work,
    with no patch matrix (what PyTorch's backward spends most of its time on at LeNet's sizes).
    Results in x's layout."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    keep = sel.keep if sel.kind == "rows" else None
    dx, dw = native.conv_rows(g, x, weight, sel.index, geo.padding, need_dx, need_dw, keep)
    if dx is not None and cl:
        dx = dx.contiguous(memory_format=torch.channels_last)
    return dx, dw


# torch: compacted; torch-cl: compacted, dx on channels_last tensors; masked: the masked g
# through the full backward; direct: the C++ kernel on the kept channels. The config's
# backend names torch or masked; auto times them (see _pick).
IMPLEMENTATIONS = {
    "torch": _impl_compact, "torch-cl": _impl_compact_cl, "masked": _impl_masked,
    "direct": _impl_direct,
}  # fmt: skip

# auto runs a compacted backward (not the masked one) where it keeps at most a quarter of the
# channels of a convolution of at least this many multiply-adds per product (LeNet's layers:
# 1e7, ResNet's 3x3 at batch 32: 1e9).
COMPACT_MACS = 10**8


def _pick(cfg: MePropConfig, sel: ChannelSelection, args: tuple) -> str:
    """The implementation for this call: the config's backend (``torch``: compacted, ``masked``:
    masked), or for ``auto`` the fastest on this call's tensors of the compacted forms
    (``torch``, ``torch-cl``), the C++ kernel (``direct``) where it serves and, except on
    large layers keeping few channels (``COMPACT_MACS``), the masked one: timed once per shape
    class and cached per machine (as ``meprop.ops`` chooses for linear layers).
    ``$MEPROP_BACKEND`` pins one (``native``: the C++ kernel where it serves)."""
    if sel.kind == "mask":
        return "masked"  # (a different channel set at each position: nothing to compact)
    if cfg.backend != "auto":
        return cfg.backend
    if sel.kind == "all" or torch.compiler.is_compiling() or untimeable(args[0]):
        return "torch"
    g, x, weight, _, geo, need_dx, need_dw = args
    kk = sel.index.shape[-1]
    sig = (
        "conv2d", sel.kind, sel.keep is None, g.dtype, g.shape, x.shape, weight.shape, geo, kk,
        need_dx, need_dw, torch.get_num_threads(),
    )  # fmt: skip
    tuner = dispatch.tuner()
    name = tuner.memo.get(sig)
    if name is not None:
        return name
    # (MEPROP_BACKEND and MEPROP_AUTOTUNE are read when a signature is first seen, as for
    # linear layers; native pins the C++ kernel where it serves; numba, triton: no conv form)
    pin = dispatch.pinned()
    batch, c_out, ho, wo = g.shape
    kh, kw = weight.shape[2:]
    macs = batch * ho * wo * c_out * weight.shape[1] * kh * kw  # of each dense product
    if pin == "native" and _direct_serves(sel, g, x, weight, geo):
        name = "direct"
    elif pin in ("torch", "masked"):
        name = pin
    elif pin is not None or not dispatch.tuning_enabled() or not g.is_cpu:
        name = "torch"
    else:
        # Compaction does k / C_out of a large convolution's work: 3-6x less time in every
        # measurement (docs/conv.md), where a timing on a busy machine could pick the masked
        # backward; there only the compacted forms are timed.
        compact = 4 * kk <= c_out and macs >= COMPACT_MACS
        names = ("torch",) + (("torch-cl",) if need_dx else ())  # (torch-cl differs in dx)
        names += () if compact else ("masked",)
        names += ("direct",) if _direct_serves(sel, g, x, weight, geo) else ()
        o = dispatch._octave
        needs = f"{'x' if need_dx else ''}{'w' if need_dw else ''}"
        cls = (
            f"conv2d/{sel.kind}/{str(g.dtype).removeprefix('torch.')}/"
            f"t{torch.get_num_threads()}/{needs}/B{o(batch)}/co{o(c_out)}/ci{o(x.shape[1])}/"
            f"hw{o(ho * wo)}/k{o(kk)}/w{kh}x{kw}/s{geo.stride[0]}x{geo.stride[1]}/"
            f"g{'1' if geo.groups == 1 else 'n'}/{'+'.join(names)}"
        )
        runs = {n: (lambda f=IMPLEMENTATIONS[n]: f(*args)) for n in names}
        name = tuner.choose(cls, runs)
    tuner.memo[sig] = name
    return name


# --------------------------------------------------------------------------------------------
# The autograd Function


class _SparseConv2dFn(torch.autograd.Function):
    """F.conv2d forward (numeric padding); backward through the top-k output channels.

    ``geo``: a ``Geometry``; ``cfg``: the layer's MePropConfig; ``counts``, ``selections``: the
    usage record or None; ``record``: the layer's KRecord for adaptive k and memory, or None.
    """

    @staticmethod
    def forward(x, weight, bias, geo, cfg, counts, selections, record):
        return F.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, geo, cfg, counts, selections, record = inputs
        ctx.save_for_backward(x, weight)
        ctx.geo, ctx.cfg, ctx.usage, ctx.record = geo, cfg, (counts, selections), record
        # the compacted all-reduce's log of the dW rows written (meprop.ddp_hook.RowLog)
        ctx.rows = None if torch.compiler.is_compiling() else getattr(weight, ROWS_ATTR, None)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        cfg, geo = ctx.cfg, ctx.geo
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        batch, c_out = g.shape[:2]
        g_in = g  # the layer's own gradient (the bias gradient's, as without memory)
        m = _usable_memory(ctx.record, g) if cfg.memory and ctx.record is not None else None
        if m is not None:
            g = g + m  # the memory (C_out, H', W') added to every example's gradient
        if cfg.mode == "per_position" and cfg.k < c_out:  # (no channel scores needed)
            s, sel = None, ChannelSelection("mask", None, position_keep(g, cfg.k, cfg.backend))
        else:
            # (B, C_out) each channel's summed |g| over its positions (half precision: float32)
            s = g.abs().sum((2, 3), dtype=score_dtype(g.dtype))
            sel = select_channels(s, cfg, ctx.record)
        args = (g, x, weight, sel, geo, need_dx, need_dw)
        dx, dw = IMPLEMENTATIONS[_pick(cfg, sel, args)](*args)
        if ctx.rows is not None and dw is not None:
            ctx.rows.add(sel)  # (adaptive k: every index, a superset of the rows written)
        if dw is not None and cfg.sparse_grad:
            rows = rows_written(sel, c_out, g.device)
            dw = weight_grad(rows, dw.index_select(0, rows), c_out, True)
        db = None
        if need_db:
            if cfg.sparse_bias and sel.kind != "all":
                mask = channel_mask(sel, batch, c_out, g.device)  # broadcasts over g
                db = g.masked_fill(~mask, 0).sum((0, 2, 3))
            else:
                db = g_in.sum((0, 2, 3))
        if cfg.memory and ctx.record is not None and sel.kind != "all" and batch:
            _memorize(ctx.record, g, sel, cfg.memory)
        counts, selections = ctx.usage
        if counts is not None:
            _record(counts, selections, sel, s, g)
        return dx, dw, db, None, None, None, None, None


def _usable_memory(record: KRecord, g: Tensor) -> Tensor | None:
    """The layer's memory, where it fits g (B, C_out, H', W'): None where there is none yet,
    or it was kept for another output size, dtype or device (the memory then restarts)."""
    m = record.memory
    if m is None or m.shape != g.shape[1:] or m.dtype != g.dtype or m.device != g.device:
        return None
    return m


def _memorize(record: KRecord, g: Tensor, sel: ChannelSelection, ratio: float) -> None:
    """Memorized back-propagation's next memory: ``ratio`` times the mean over the batch of
    what the selection dropped of ``g`` (B, C_out, H', W'; the gradient with the memory added),
    (C_out, H', W'), as ``SparseLinear``'s (n,) memory is for its rows: the next batch's
    examples each carry it. Outside any graph (a constant of the next step)."""
    batch, c_out = g.shape[:2]
    kept = channel_mask(sel, batch, c_out, g.device)  # broadcasts over g
    record.memory = g.detach().masked_fill(kept, 0).sum(0).mul_(ratio / batch)


def _record(
    counts: Tensor, selections: Tensor | None, sel: ChannelSelection, s: Tensor, g: Tensor
) -> None:
    """meSimp's usage record: per output channel, the examples that kept it with a non-zero
    gradient (as ``SparseLinear`` counts its units); ``selections`` adds the batch size. With
    ``per_position`` the unit of selection is an (example, position): a channel counts each
    one that kept it with a non-zero gradient, and ``selections`` adds B x H' x W'."""
    with torch.no_grad():
        if sel.kind == "mask":
            counts.add_((sel.keep & (g != 0)).sum((0, 2, 3)).to(counts.dtype))
            if selections is not None:
                selections.add_(g.shape[0] * g.shape[2] * g.shape[3])
            return
        if sel.kind == "all":
            counts.add_((s != 0).sum(0).to(counts.dtype))
        elif sel.kind == "cols":
            counts.index_add_(
                0, sel.index, (s.index_select(1, sel.index) != 0).sum(0).to(counts.dtype)
            )
        else:
            nz = s.gather(1, sel.index) != 0  # (B, K)
            if sel.keep is not None:
                nz &= sel.keep
            counts.index_add_(0, sel.index.reshape(-1), nz.reshape(-1).to(counts.dtype))
        if selections is not None:
            selections.add_(s.shape[0])


def _check_not_in_ddp(c_out: int, k: int) -> None:
    """sparse_grad=True under any DistributedDataParallel (meprop.distributed's included,
    whose sparse buckets take linear layers' 2-d gradients only) is refused by name."""
    if DistributedDataParallel._get_active_ddp_module() is not None:
        raise RuntimeError(
            f"SparseConv2d({c_out} channels, k={k}) has sparse_grad=True and runs inside "
            "DistributedDataParallel, which cannot reduce its channel-sparse 4-d weight "
            "gradient: use MePropConfig(sparse_grad=False) for convolutions under DDP"
        )


# --------------------------------------------------------------------------------------------
# The module


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose backward keeps only the top-k output channels of the gradient.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as ``nn.Conv2d`` (every setting: ``"same"`` and
            ``"valid"`` padding, asymmetric ``"same"`` included, and the four padding modes
            are padded before the sparse backward, as ``nn.Conv2d`` pads).
        config: a ``MePropConfig``; ``k`` counts output channels: per example (``per_example``,
            ``random``) or per call (``unified``). ``out_channels <= k`` computes exactly
            ``nn.Conv2d``'s gradients. ``mode="symmetric"`` and the
            ``native``/``numba``/``triton`` backends are refused (see ``meprop.conv``);
            ``adapt`` and ``memory`` (eager mode only), ``warmup``, ``scope``, ``sparse_bias``
            and ``sparse_grad`` (a weight gradient sparse over its output channels) work as for
            ``SparseLinear``.

    Attributes:
        usage: ``None``, or ``(counts (out_channels,), selections (1,))`` that backward
            increments (per channel, the examples that kept it with a non-zero gradient; the
            examples). meSimp's Simplifier does not prune convolutions: the record is for
            reading.
        k_record: a ``meprop.adaptive.KRecord`` (adaptive k's memory, ``last_k``, warmup).
        last_k: the mean k of the latest backward (None before the first).

    Example:
        >>> conv = SparseConv2d(64, 64, 3, padding=1, config=MePropConfig(k=8, mode="unified"))
        >>> conv
        SparseConv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), k=8, mode=unified)
    """

    config: MePropConfig
    usage: tuple[Tensor, Tensor] | None
    k_record: KRecord

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        config: MePropConfig | None = None,
    ) -> None:
        if not isinstance(config, MePropConfig):
            raise TypeError(
                f"SparseConv2d needs config=MePropConfig(k=...), got {type(config).__name__}"
            )
        check_conv_config(config)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype,
        )  # fmt: skip
        self.config = config
        self.usage = None
        self.k_record = KRecord()

    @property
    def last_k(self) -> float | None:
        return self.k_record.last_k

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(input.unsqueeze(0)).squeeze(0)
        cfg, record, c_out = self.config, self.k_record, self.out_channels
        training = builds_graph(input, self.weight)
        if cfg.warmup and record.calls < cfg.warmup and training:
            record.calls += 1  # a warm-up step: the dense layer
            record.last_k = float(c_out)
            return self._conv_forward(input, self.weight, self.bias)
        if cfg.adapt is None or cfg.k >= c_out:
            record.last_k = float(min(cfg.k, c_out))
        if self.usage is None and cfg.k >= c_out and not cfg.sparse_grad or not training:
            # keeps everything (or no backward will run): nn.Conv2d itself, bit-exact
            return self._conv_forward(input, self.weight, self.bias)
        if cfg.adapt is not None and torch.compiler.is_compiling():
            raise RuntimeError(
                "SparseConv2d's adaptive k (MePropConfig(adapt=...)) reads each backward's k on "
                "the host and does not trace under torch.compile; use a fixed k (adapt=None) "
                "or run the model eagerly"
            )
        remember = cfg.memory and cfg.k < c_out
        if remember and (
            torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
        ):
            raise RuntimeError(
                f"SparseConv2d's memory={cfg.memory:g} (memorized back-propagation) keeps the "
                "dropped gradient between steps outside the graph, so it does not run under "
                "torch.compile or a torch.func transform; use MePropConfig(memory=0) there, "
                "or run the model eagerly"
            )
        if cfg.sparse_grad and not torch.compiler.is_compiling():
            _check_not_in_ddp(c_out, cfg.k)
        x, padding = self._padded(input)
        geo = Geometry(self.stride, padding, self.dilation, self.groups)
        usage = (None, None) if self.usage is None else self.usage
        adaptive = cfg.adapt is not None and cfg.k < c_out
        args = (geo, cfg, *usage, record if adaptive or remember else None)
        return apply_autocast(_SparseConv2dFn, x, self.weight, self.bias, *args)

    def _padded(self, input: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``input`` padded as ``nn.Conv2d`` pads it, and the numeric padding left for the
        convolution: non-zero padding modes and asymmetric ``"same"`` are padded here (the
        pad's backward slices the gradient), symmetric zero padding stays in the convolution."""
        rev = self._reversed_padding_repeated_twice  # (left, right, top, bottom)
        if self.padding_mode != "zeros":
            return F.pad(input, rev, mode=self.padding_mode), (0, 0)
        if self.padding == "valid":
            return input, (0, 0)
        if self.padding == "same":
            if rev[0] == rev[1] and rev[2] == rev[3]:
                return input, (rev[2], rev[0])
            return F.pad(input, rev), (0, 0)
        return input, tuple(self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + config_repr(self.config)
