"""The obviously-right meProp backward, for tests and checks: mask the output gradient, then
the dense formulas. Every fast path (``meprop.ops``, the kernels, ``SparseLSTM``) is tested
against these.

* Linear: ``mask_gradient`` and ``reference_backward``.
* LSTM: ``reference_lstm``, a Python cell loop under autograd whose gate pre-activations have
  their gradient masked to the selected entries (``mask_topk_grad``) at every step.
* Conv2d: ``mask_conv_gradient`` (the kept output channels of g) and
  ``reference_conv2d_backward`` (the masked g through ``nn.Conv2d``'s own autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .config import MODES
from .lstm import param_names
from .ops import select_columns

__all__ = [
    "mask_gradient", "reference_backward", "reference_memory_backward", "mask_topk_grad",
    "reference_lstm", "mask_conv_gradient", "reference_conv2d_backward",
    "reference_conv2d_memory_backward",
]  # fmt: skip


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
    elif mode == "symmetric":  # the k//2 largest positive, the k - k//2 largest negative
        h = k // 2
        pos, neg = g.clamp(min=0), g.clamp(max=0)
        keep_p = torch.zeros_like(g, dtype=torch.bool)
        keep_n = torch.zeros_like(g, dtype=torch.bool)
        if h:
            keep_p.scatter_(1, pos.topk(h, dim=1).indices, True)
        keep_n.scatter_(1, (-neg).topk(k - h, dim=1).indices, True)
        # each half keeps only its sign: where a row has fewer entries of one sign, that
        # half's extra picks are worth 0
        return pos * keep_p + neg * keep_n
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


def reference_memory_backward(
    x: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    k: int,
    mode: str,
    memory: Tensor,
    ratio: float,
    sparse_bias: bool = False,
    selection: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``MePropConfig(memory=ratio)``'s backward, obviously: add the memory (n,) to every row
    of g, mask that to its top-k, run the dense formulas; the next memory is ``ratio`` times
    the mean over the rows of what the mask dropped. The bias gradient is the plain one (from
    g), or with ``sparse_bias`` the kept entries' sums.

    Returns (dx shaped like x, dW (n, in), db (n,), the next memory (n,)).
    """
    g = grad_out.reshape(-1, weight.shape[0])
    gm = g + memory
    # reference_backward on g + m; its sparse bias gradient is the kept entries' sums
    dx, dw, kept = reference_backward(x, weight, gm, k, mode, True, selection)
    db = kept if sparse_bias else g.sum(0)
    return dx, dw, db, ratio * (gm.sum(0) - kept) / g.shape[0]


# --------------------------------------------------------------------------------------------
# LSTM


class _MaskTopkGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, k, mode, valid, idx):
        ctx.k, ctx.mode, ctx.valid, ctx.idx = k, mode, valid, idx
        return gates.clone()

    @staticmethod
    def backward(ctx, g):
        k, mode, valid, idx = ctx.k, ctx.mode, ctx.valid, ctx.idx
        if valid is None:
            valid = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        mask = torch.zeros_like(g, dtype=torch.bool)
        if idx is not None:  # given selections (random mode): -1 marks ended sequences
            mask[valid] = mask[valid].scatter(1, idx[valid], True)
        elif mode == "unified":
            mask[:, select_columns(g[valid], k)] = True  # scores summed in float32
        elif mode == "per_example":
            mask.scatter_(1, g.abs().topk(k, dim=1).indices, True)
        elif mode == "symmetric":
            return mask_gradient(g, k, mode) * valid.unsqueeze(1), None, None, None, None
        else:
            raise ValueError(f"mode={mode!r} needs the selections (idx); modes: {MODES}")
        return g * (mask & valid.unsqueeze(1)), None, None, None, None


def mask_topk_grad(
    gates: Tensor, k: int, mode: str, valid: Tensor | None = None, idx: Tensor | None = None
) -> Tensor:
    """Identity on ``gates`` (B, 4H) whose backward keeps only the selected gradient entries.

    ``per_example``: the top-k |grad| of each row; ``unified``: the k columns with the largest
    sum of |grad| over the ``valid`` rows (B,) bool; or the given ``idx`` (B, k) (any mode).
    Rows not ``valid`` get no gradient.
    """
    return _MaskTopkGrad.apply(gates, k, mode, valid, idx)


def reference_lstm(
    lstm: nn.LSTM,
    input,
    hx=None,
    *,
    k: int | None = None,
    mode: str | None = None,
    sparse_bias: bool | None = None,
    selections: dict | None = None,
):
    """The obviously-right meProp LSTM: a Python cell loop under autograd, with each step's gate
    pre-activations masked in backward (``mask_topk_grad``).

    Same inputs and outputs as ``SparseLSTM`` (padded, batch_first, PackedSequence; hx as a
    stacked tensor or per-(layer, direction) sequences). ``k``, ``mode``, ``sparse_bias``
    default to ``lstm.config`` (a plain nn.LSTM: no masking). The bias gradient comes from the
    unmasked gradient unless ``sparse_bias``. ``selections``: ``{(layer, direction): idx (T, B,
    k)}`` to use instead of selecting (as ``SparseLSTM.debug_selections`` records them).
    Dropout is not applied: call it in eval mode or with dropout=0.
    """
    cfg = getattr(lstm, "config", None)
    k = k if k is not None else (cfg.k if cfg is not None else None)
    mode = mode if mode is not None else (cfg.mode if cfg is not None else "per_example")
    if sparse_bias is None:
        sparse_bias = cfg.sparse_bias if cfg is not None else False
    if lstm.training and lstm.dropout:
        raise ValueError("reference_lstm applies no dropout: call lstm.eval() or use dropout=0")
    packed = isinstance(input, PackedSequence)
    x, lengths, unbatched, h0s, c0s, widths = _reference_inputs(lstm, input, hx)
    n_steps, dirs = x.shape[0], 2 if lstm.bidirectional else 1
    valid = torch.arange(n_steps).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)
    valid = valid.to(x.device)
    hs, cs = [], []
    layer_in = x  # (T, B, in)
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(dirs):
            j = layer * dirs + d
            sel = None if selections is None else selections[(layer, d)]
            y, h, c = _reference_direction(lstm, layer, d, layer_in, h0s[j], c0s[j], valid,
                                           k, mode, sparse_bias, sel)  # fmt: skip
            outs.append(y)
            hs.append(h)
            cs.append(c)
        layer_in = torch.cat(outs, 2)
    if unbatched:
        hs, cs = [h.squeeze(0) for h in hs], [c.squeeze(0) for c in cs]
    stack = len(set(widths)) == 1
    h_n = torch.stack(hs) if stack else tuple(hs)
    c_n = torch.stack(cs) if stack else tuple(cs)
    if packed:
        out = torch.nn.utils.rnn.pack_padded_sequence(layer_in, lengths, enforce_sorted=False)
    elif unbatched:
        out = layer_in.squeeze(1)
    else:
        out = layer_in.transpose(0, 1) if lstm.batch_first else layer_in
    return out, (h_n, c_n)


def _reference_direction(lstm, layer, d, layer_in, h, c, valid, k, mode, sparse_bias, sel):
    """One (layer, direction) of ``reference_lstm``: the cell loop over the padded steps
    ``layer_in`` (T, B, in) from states ``h``, ``c`` (B, H); returns the outputs (T, B, H), zero
    past each sequence's end, and the final states."""
    w_ih, w_hh, b_ih, b_hh = (getattr(lstm, n, None) for n in param_names(layer, d))
    hid, n_steps = w_hh.shape[1], layer_in.shape[0]
    ys = [None] * n_steps
    for t in range(n_steps - 1, -1, -1) if d else range(n_steps):
        m = valid[t].unsqueeze(1)
        pre = layer_in[t] @ w_ih.t() + h @ w_hh.t()
        if lstm.bias and sparse_bias:
            pre = pre + b_ih + b_hh
        if k is not None and (k < 4 * hid or sel is not None):
            pre = mask_topk_grad(pre, k, mode, valid[t], None if sel is None else sel[t])
        if lstm.bias and not sparse_bias:  # the bias sees the unmasked gradient
            pre = pre + b_ih + b_hh
        i, f, g, o = pre.split(hid, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        h_new = o * c_new.tanh()
        h = torch.where(m, h_new, h)  # a sequence's state stops at its length
        c = torch.where(m, c_new, c)
        ys[t] = h_new * m  # zero past the end, as pad_packed_sequence gives
    return torch.stack(ys), h, c


def _reference_inputs(lstm, input, hx):
    """``reference_lstm``'s input as padded steps x (T, B, in), the sequences' lengths (B,),
    whether it was unbatched, the initial states per (layer, direction) and their widths."""
    unbatched = False
    if isinstance(input, PackedSequence):
        x, lengths = pad_packed_sequence(input)  # (T, B, in), original batch order
    else:
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else input
        x = x.transpose(0, 1) if lstm.batch_first and not unbatched else x
        lengths = torch.full((x.shape[1],), x.shape[0])
    batch = x.shape[1]
    dirs = 2 if lstm.bidirectional else 1
    widths = [
        getattr(lstm, param_names(layer, d)[1]).shape[1]
        for layer in range(lstm.num_layers)
        for d in range(dirs)
    ]
    if hx is None:
        h0s = [x.new_zeros(batch, h) for h in widths]
        c0s = [x.new_zeros(batch, h) for h in widths]
    else:
        h0s, c0s = (
            [
                p.unsqueeze(0) if unbatched else p
                for p in (list(s.unbind(0)) if isinstance(s, Tensor) else s)
            ]
            for s in hx
        )
    return x, lengths, unbatched, h0s, c0s, widths


# --------------------------------------------------------------------------------------------
# Conv2d


def mask_conv_gradient(g: Tensor, k: int, mode: str, selection: Tensor | None = None) -> Tensor:
    """``g`` (B, C_out, H', W') with every output channel but the kept ones set to zero.

    A channel's score is its summed |g| over the positions (float32 for half precision);
    ``unified`` keeps the k channels with the largest scores summed over the batch too,
    ``per_example`` each example's k largest. ``random`` needs its draw: ``selection`` (B, k)
    (``meprop.conv.random_channels``), which any mode may be given instead of selecting.
    ``per_position`` keeps, at each position of each example, the k channels of largest |g|.
    """
    batch, c_out = g.shape[:2]
    if k >= c_out and selection is None:
        return g.clone()
    if mode == "per_position" and selection is None:
        top = g.abs().topk(k, dim=1).indices  # (B, k, H', W'): the kept channels per position
        keep = torch.zeros(g.shape, dtype=torch.bool, device=g.device).scatter_(1, top, True)
        return torch.where(keep, g, torch.zeros((), dtype=g.dtype))
    dt = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    scores = g.abs().to(dt).sum((2, 3))  # (B, C_out)
    keep = torch.zeros(batch, c_out, dtype=torch.bool, device=g.device)
    if selection is not None:
        keep.scatter_(1, selection if selection.dim() == 2 else selection.expand(batch, -1), True)
    elif mode == "unified":
        keep[:, scores.sum(0).topk(k).indices] = True
    elif mode == "per_example":
        keep.scatter_(1, scores.topk(k, dim=1).indices, True)
    elif mode == "random":
        raise ValueError("mode='random' needs the drawn channels (selection)")
    else:
        raise ValueError(
            f"mode must be 'per_example', 'unified', 'random' or 'per_position', got {mode!r}"
        )
    return torch.where(keep[:, :, None, None], g, torch.zeros((), dtype=g.dtype))


def reference_conv2d_backward(
    conv: nn.Conv2d,
    x: Tensor,
    grad_out: Tensor,
    k: int,
    mode: str,
    sparse_bias: bool = False,
    selection: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The obviously-right meProp convolution backward: mask g to its kept channels
    (``mask_conv_gradient``), then ``nn.Conv2d``'s own forward and autograd (its padding,
    padding mode, stride, dilation and groups) on fresh copies of x and the parameters.

    Returns (dx, dW, db); db from the full g (or the masked one with ``sparse_bias``), None
    without a bias.
    """
    xr = x.detach().clone().requires_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    y = nn.Conv2d._conv_forward(conv, xr, w, None)
    gm = mask_conv_gradient(grad_out, k, mode, selection)
    dx, dw = torch.autograd.grad(y, (xr, w), gm)
    db = None if conv.bias is None else (gm if sparse_bias else grad_out).sum((0, 2, 3))
    return dx, dw, db


def reference_conv2d_memory_backward(
    conv: nn.Conv2d,
    x: Tensor,
    grad_out: Tensor,
    k: int,
    mode: str,
    memory: Tensor,
    ratio: float,
    sparse_bias: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``MePropConfig(memory=ratio)`` on a convolution, obviously: add the memory
    (C_out, H', W') to every example's g, mask that to its kept channels, run
    ``reference_conv2d_backward``'s dense formulas; the next memory is ``ratio`` times the mean
    over the batch of what the mask dropped. The bias gradient is the plain one (from g), or
    with ``sparse_bias`` the kept channels' sums.

    Returns (dx, dW, db, the next memory (C_out, H', W')).
    """
    g = grad_out + memory
    dx, dw, _ = reference_conv2d_backward(conv, x, g, k, mode)
    kept = mask_conv_gradient(g, k, mode)
    db = None if conv.bias is None else (kept if sparse_bias else grad_out).sum((0, 2, 3))
    return dx, dw, db, ratio * (g - kept).sum(0) / g.shape[0]
