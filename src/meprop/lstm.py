"""meProp for LSTMs: ``SparseLSTM``, an ``nn.LSTM`` with a sparse backward through time.

Sun et al., "meProp" (ICML 2017), section on LSTMs: top-k is applied to the gradients of the
gate pre-activations (the linear maps of the input and of the hidden state into the four gates)
at every time step. For one layer and direction with hidden width H, step t computes

    G_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          (B, 4H), gates i, f, g, o
    c_t = f * c_{t-1} + i * g          h_t = o * tanh(c_t)

and backward, going back in time, forms dG_t (B, 4H) from the output gradient at t and the
gradients flowing back from step t + 1, keeps its top k (``meprop.ops`` semantics:
``per_example``, ``unified`` or ``random``) as dG~_t, and continues with only that:

    dh_{t-1} (recurrent part) = dG~_t W_hh        dW_hh = sum_t dG~_t^T h_{t-1}
    dx_t = dG~_t W_ih                             dW_ih = sum_t dG~_t^T x_t

Only the recurrence dh_{t-1} has to run step by step; the four other sums are one row-sparse
product each over all (T*B) rows at the end. Bias gradients come from the full dG_t (default)
or from dG~_t (``sparse_bias``).

meSimp (Sun et al., TKDE): backward merges the selected gate indices of a step into the usage
record of their memory cells (index mod H); ``meprop.lstm_prune`` removes the cells.

``meprop.reference.reference_lstm`` is the obviously-right version (a Python cell loop under
autograd whose gate pre-activations have their gradient masked to the selected entries); the
fast path is tested against it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .adaptive import KRecord, batch_k, row_ks
from .config import MePropConfig
from .grads import check_not_in_plain_ddp, weight_grad
from .nn import swap_class
from .ops import (
    Selection,
    autocast_cast,
    autocast_dtype,
    column_scores,
    compact_products,
    kernel_module,
    select_columns,
    select_rows,
)

__all__ = ["SparseLSTM"]

Key = tuple[int, int]  # (layer, direction): direction 0 runs forward in time, 1 backward


def param_names(layer: int, direction: int) -> tuple[str, str, str, str]:
    """nn.LSTM's parameter names of one (layer, direction)."""
    s = f"l{layer}{'_reverse' if direction else ''}"
    return f"weight_ih_{s}", f"weight_hh_{s}", f"bias_ih_{s}", f"bias_hh_{s}"


# --------------------------------------------------------------------------------------------
# Layout. All tensors inside are "packed": time-major rows, step t holding the rows
# [offset_t, offset_t + n_t) with n_t non-increasing in t (PackedSequence's layout: the batch
# sorted by length, so the sequences still running at t are the first n_t). A padded input
# without lengths is the special case n_t = B. Each sequence's state thus stops at its own
# last step, and the reverse direction starts at it, with no masking and no work on padding.

Steps = tuple[tuple[int, int], ...]  # (offset, n) per time step, in time order


def _steps_from_batch_sizes(batch_sizes: Sequence[int]) -> Steps:
    out, off = [], 0
    for n in batch_sizes:
        out.append((off, int(n)))
        off += int(n)
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _previous_rows(steps: Steps, reverse: bool) -> Tensor:
    """For each packed row, the row of [y; h0] ((N + B) rows) holding its previous state.

    Row r of step t continues row r of the step processed just before (t - 1 forward, t + 1
    in reverse) where that step had a row r, else (a sequence that starts at t: every row of
    the first step processed, or a shorter sequence's last step in reverse) row r of h0, i.e.
    row N + r. (N,) int64 on the CPU, built with a few vectorised ops; cached per layout.
    """
    offs = torch.tensor([o for o, _ in steps])  # (T,)
    ns = torch.tensor([n for _, n in steps])  # (T,)
    n_rows = int(ns.sum())
    prev_off, prev_n = offs.roll(-1 if reverse else 1), ns.roll(-1 if reverse else 1)
    prev_n[-1 if reverse else 0] = 0  # the first step processed has no predecessor
    carried = torch.minimum(ns, prev_n)  # rows continuing from the previous step
    step = torch.repeat_interleave(torch.arange(len(steps)), ns)  # (N,) each row's step
    r = torch.arange(n_rows) - offs[step]  # (N,) row within its step
    return torch.where(r < carried[step], prev_off[step] + r, n_rows + r)


# --------------------------------------------------------------------------------------------
# One layer, one direction, the whole sequence


class DebugSink(NamedTuple):
    """Where backward records one (layer, direction)'s selections (``debug_selections``)."""

    store: dict
    key: Key
    sorted_indices: Tensor | None  # the PackedSequence's batch order, or None


class _LSTMDirectionFn(torch.autograd.Function):
    """One (layer, direction) over all time steps; backward through the top-k of each dG_t.

    ``config`` gives k, the mode and the gradient options; backward adds its selections to
    ``usage`` (counts (H,), selections (1,)) and ``debug`` where they are not None, and sets
    ``record.last_k`` (the mean k over the steps' rows; adaptive k's memory lives there too).
    """

    @staticmethod
    def forward(
        ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, steps, reverse, config, usage, debug, record, save
    ):
        # x (N, in) packed rows; h0, c0 (B, H); w_ih (4H, in); w_hh (4H, H); b_* (4H,) or None.
        hid = w_hh.shape[1]
        n_rows, batch = x.shape[0], h0.shape[0]
        # The input-to-gates projection of all steps at once: one GEMM (N, in) x (in, 4H).
        if b_ih is not None:
            xw = torch.addmm(b_ih + b_hh, x, w_ih.t())
        else:
            xw = x @ w_ih.t()
        # W_hh^T (H, 4H) for the step GEMMs; a contiguous copy (once per call) makes MKL's
        # small-batch GEMMs ~10% faster, which pays for the copy from a batch of about 8.
        whh_t = w_hh.t().contiguous() if batch >= 8 else w_hh.t()
        # Each step turns its rows of xw into gate pre-activations, then into activations, in
        # place: xw becomes the gate activations i, f, g, o of every step (N, 4H).
        acts = xw
        cells = xw.new_empty(n_rows, hid)  # c_t (N, H)
        tanh_c = xw.new_empty(n_rows, hid)  # tanh(c_t) (N, H)
        y = xw.new_empty(n_rows, hid)  # h_t, the output (N, H)
        h, c = h0, c0  # (B, H): rows past a sequence's end (or not yet started) are carried
        for off, n in reversed(steps) if reverse else steps:
            sl = slice(off, off + n)
            hp = h if n == batch else h[:n]
            cp = c if n == batch else c[:n]
            a = acts[sl].addmm_(hp, whh_t)  # (n, 4H) pre-activations
            i, f, g, o = a.split(hid, 1)
            a[:, : 2 * hid].sigmoid_()
            g.tanh_()
            o.sigmoid_()
            c_new = torch.mul(f, cp, out=cells[sl])
            c_new.addcmul_(i, g)
            tc = torch.tanh(c_new, out=tanh_c[sl])
            h_new = torch.mul(o, tc, out=y[sl])
            h = h_new if n == batch else torch.cat([h_new, h[n:]])
            c = c_new if n == batch else torch.cat([c_new, c[n:]])
        if save:
            # h_{t-1} and c_{t-1} are rebuilt in backward from y, cells and h0, c0.
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh, acts, cells, tanh_c, y)
            ctx.steps, ctx.reverse, ctx.has_bias = steps, reverse, b_ih is not None
            ctx.config, ctx.usage, ctx.debug, ctx.record = config, usage, debug, record
        # h and c may be views of y and cells: outputs must not alias each other or saved
        # tensors.
        return y, h.clone(), c.clone()

    @staticmethod
    def backward(ctx, dy, dhn, dcn):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                f"SparseLSTM(k={ctx.config.k}, mode={ctx.config.mode}) has no second-order "
                "backward: torch.autograd.grad(..., create_graph=True) (or backward with "
                "create_graph=True) would get first-order gradients detached from the graph; "
                "leave the LSTM dense (sparsify_(..., filter_fn=...)) for gradient penalties"
            )
        x, h0, c0, w_ih, w_hh, acts, cells, tanh_c, y = ctx.saved_tensors
        steps, reverse, cfg = ctx.steps, ctx.reverse, ctx.config
        # h_{t-1}, c_{t-1} of every row (N, H): one gather each from [y; h0] and [cells; c0].
        rows_of = _previous_rows.__wrapped__ if torch.compiler.is_compiling() else _previous_rows
        prev = rows_of(steps, reverse).to(acts.device)
        h_prev = torch.cat([y, h0]).index_select(0, prev)
        c_prev = torch.cat([cells, c0]).index_select(0, prev)
        k, mode = cfg.k, cfg.mode
        need_x, need_h0, need_c0, need_wih, need_whh = ctx.needs_input_grad[:5]
        need_b = ctx.has_bias and any(ctx.needs_input_grad[5:7])
        hid = w_hh.shape[1]
        n4 = 4 * hid
        n_rows, batch = acts.shape[0], dhn.shape[0]

        # Derivative multipliers of all steps at once (a few passes over (N, 4H) instead of
        # many small ops per step), so that a step's gate gradient is one multiplication:
        # dG = [dc, dc, dc, dh] * mult (n, 4H), with dh the hidden-state gradient at that step
        # and dc the cell gradient after adding dh * o * (1 - tanh(c)^2).
        i, f, g, o = acts.split(hid, 1)
        mult = torch.addcmul(acts, acts, acts, value=-1)  # a (1 - a): sigmoid' (i, f, o)
        m_i, m_f, m_g, m_o = mult.split(hid, 1)
        m_i.mul_(g)  # dG_i = dc * g * i (1 - i)
        m_f.mul_(c_prev)  # dG_f = dc * c_{t-1} * f (1 - f)
        if torch.compiler.is_compiling():  # (Dynamo takes no out= of a column slice)
            m_g.copy_(i).addcmul_(i, g * g, value=-1)
        else:
            torch.addcmul(i, i, g * g, value=-1, out=m_g)  # dG_g = dc * i * (1 - g^2)
        m_o.mul_(tanh_c)  # dG_o = dh * tanh(c_t) * o (1 - o)
        dc_from_h = torch.addcmul(o, o, tanh_c * tanh_c, value=-1)  # o (1 - tanh(c)^2) (N, H)

        dense = k >= n4
        kern = None if dense else kernel_module(cfg.backend, acts)  # compiled kernels or None
        adapt = None if dense else cfg.adapt
        if adapt is not None and torch.compiler.is_compiling():
            _adaptive_untraced()
        record = ctx.record if ctx.record is not None or adapt is None else KRecord()
        kept = [0.0]  # adaptive: the k's kept, summed over the steps' rows
        dgates = torch.empty_like(acts)  # the full dG of every step (N, 4H)
        idx_t: list = [None] * len(steps)  # per step: selected columns (n, k) and values
        val_t: list = [None] * len(steps)
        dh, dc = dhn, dcn  # (B, H)
        order = range(len(steps)) if reverse else range(len(steps) - 1, -1, -1)
        for t in order:
            off, n = steps[t]
            sl = slice(off, off + n)
            dh_a = dy[sl] + (dh if n == batch else dh[:n])  # (n, H)
            dc_a = torch.addcmul(dc if n == batch else dc[:n], dh_a, dc_from_h[sl])
            dg = torch.mul(torch.cat([dc_a, dc_a, dc_a, dh_a], 1), mult[sl], out=dgates[sl])
            dc_p = dc_a * f[sl]
            if dense:
                dh_p = dg @ w_hh
            else:
                idx_t[t], val_t[t], dh_p = _select_step(
                    dg, k, mode, kern, w_hh, adapt, record, kept
                )
            dh = dh_p if n == batch else torch.cat([dh_p, dh[n:]])
            dc = dc_p if n == batch else torch.cat([dc_p, dc[n:]])

        if ctx.record is not None:  # adaptive k (a fixed k's last_k is set in forward)
            record.last_k = kept[0] / n_rows if adapt is not None and n_rows else float(min(k, n4))
        dx = dw_ih = dw_hh = db = None
        if dense:
            sel = Selection("dense")
            dx = dgates @ w_ih if need_x else None
            if need_wih:
                dw_ih = dgates.t() @ x
            if need_whh:
                dw_hh = dgates.t() @ h_prev
            if cfg.sparse_grad:
                rows = torch.arange(n4, device=acts.device)
                dw_ih = None if dw_ih is None else weight_grad(rows, dw_ih, n4, True)
                dw_hh = None if dw_hh is None else weight_grad(rows, dw_hh, n4, True)
        else:
            # dG~ of all steps in index/value form (N, k) (a unified step's columns repeated
            # on each of its rows): the same row-sparse products as the Linear path, each over
            # all N rows at once.
            sel = Selection("rows", torch.cat(idx_t), torch.cat(val_t))
            dx, dw_ih, dw_hh = _final_products(
                sel, w_ih, x, h_prev, kern, need_x, need_wih, need_whh, cfg.sparse_grad
            )
        if need_b:
            if cfg.sparse_bias and sel.kind == "rows":
                db = dgates.new_zeros(n4).index_add_(0, sel.index.flatten(), sel.values.flatten())
            else:
                db = dgates.sum(0)
        if ctx.usage is not None:
            _record_cells(ctx.usage, sel, hid, n_rows)
        if ctx.debug is not None and sel.kind == "rows":
            dbg = ctx.debug
            dbg.store[dbg.key] = _padded_selection(sel.index, steps, batch, dbg.sorted_indices)
        return (
            dx,
            dh if need_h0 else None,
            dc if need_c0 else None,
            dw_ih,
            dw_hh,
            db if need_b and ctx.needs_input_grad[5] else None,
            db if need_b and ctx.needs_input_grad[6] else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


@functools.partial(
    torch.compiler.disable,
    reason=(
        "SparseLSTM's adaptive k (MePropConfig(adapt=...)) reads each step's k on the host, "
        "which torch.compile cannot trace: use a fixed k (adapt=None) with fullgraph=True, or "
        "compile without fullgraph (the LSTM's backward then runs eagerly)"
    ),
)
def _adaptive_untraced() -> None:
    """Marks adaptive k's backward through time as not traceable (a graph break)."""


def _select_step(dg: Tensor, k: int, mode: str, kern, w_hh: Tensor, adapt=None, record=None,
                 kept=None):  # fmt: skip
    """Sparsify one step's gate gradient dg (n, 4H) and push it through W_hh.

    Returns the selection as idx, vals (n, k) and dh_{t-1} = dG~ W_hh (n, H), computed from the
    k selected rows of W_hh only. With ``adapt`` (an AdaptiveK): each row's (per_example) or
    the step's (unified) k from ``meprop.adaptive`` with ``record``, at most k; the selection is
    padded to width k (value 0) and ``kept[0]`` adds the k's.
    """
    if adapt is not None:
        n = dg.shape[0]
        if mode == "unified":
            kb, cols = batch_k(column_scores(dg), k, adapt, record)  # (kb,)
            vals = dg.index_select(1, cols)  # (n, kb)
            dh_p = vals @ w_hh.index_select(0, cols)
            idx = cols.expand(n, kb)
            kept[0] += kb * n
        else:
            idx, vals, ks, big = row_ks(dg, k, adapt, record, kern)  # (n, K), zero past ks
            # past a row's k: its first (kept) column, so the recorded selection is what was kept
            past = torch.arange(big, device=dg.device) >= ks.unsqueeze(1)
            idx = torch.where(past, idx[:, :1], idx)
            dh_p = kern.rows_matmul(idx, vals, w_hh) if kern is not None else None
            if dh_p is None:
                dh_p = torch.bmm(vals.unsqueeze(1), w_hh[idx]).squeeze(1)
            kept[0] += record.last_k * n  # (row_ks: the mean over the rows)
        pad = k - idx.shape[1]  # one width for every step (torch.cat), the padding worth 0
        if pad:
            idx = torch.cat([idx, idx[:, :1].expand(n, pad)], 1)
            vals = torch.cat([vals, vals.new_zeros(n, pad)], 1)
        return idx, vals, dh_p
    if mode == "unified":
        cols = select_columns(dg, k)  # (k,): one set for the whole step
        vals = dg.index_select(1, cols)  # (n, k)
        dh_p = vals @ w_hh.index_select(0, cols)  # compacted dense GEMM (n, k) x (k, H)
        return cols.expand(dg.shape[0], k), vals, dh_p
    if kern is not None:
        idx, vals = select_rows(dg, k, mode, kernels=kern if mode == "per_example" else None)
        return idx, vals, kern.rows_matmul(idx, vals, w_hh)
    idx, vals = select_rows(dg, k, mode)
    # sum_j vals[r, j] W_hh[idx[r, j]]: a gather of n*k rows, then a batched dot (n, 1, k).
    dh_p = torch.bmm(vals.unsqueeze(1), w_hh[idx]).squeeze(1)
    return idx, vals, dh_p


def _final_products(sel: Selection, w_ih, x, h_prev, kern, need_x, need_wih, need_whh, sparse_grad):
    """dX = dG~ W_ih (N, in), dW_ih = dG~^T X (4H, in), dW_hh = dG~^T H_prev (4H, H).

    The kernels work from the index/value form of dG~ (``sel``, kind "rows"); otherwise dG~
    is compacted to the union of its columns, as in ``meprop.ops``.
    """
    idx, vals = sel.index, sel.values
    n4 = w_ih.shape[0]
    dx = dw_ih = dw_hh = None
    if kern is not None:
        if need_x:
            dx = kern.rows_matmul(idx, vals, w_ih)
        for need, src, slot in ((need_wih, x, 0), (need_whh, h_prev, 1)):
            if not need:
                continue
            if not sparse_grad:
                dw = kern.rows_outer_dense(idx, vals, src, n4)
            else:
                rows, dw_rows = kern.rows_outer(idx, vals, src, n4)
                dw = weight_grad(rows, dw_rows, n4, sparse_grad)
            if slot == 0:
                dw_ih = dw
            else:
                dw_hh = dw
        return dx, dw_ih, dw_hh
    rows = idx.flatten().unique()  # sorted union of the selected gate rows (R,)
    gm = vals.new_zeros(idx.shape[0], n4).scatter_add_(1, idx, vals)  # dG~ (N, 4H) (adaptive
    # k pads rows with a kept column, value 0: added, not written over the kept value)
    gc = gm.index_select(1, rows)  # (N, R)
    dx, dw_rows = compact_products(gc, rows, w_ih, x, need_x, need_wih)
    if need_wih:
        dw_ih = weight_grad(rows, dw_rows, n4, sparse_grad)
    if need_whh:
        dw_hh = weight_grad(rows, gc.t() @ h_prev, n4, sparse_grad)
    return dx, dw_ih, dw_hh


def _record_cells(usage: tuple[Tensor, Tensor], sel: Selection, hid: int, n_rows: int) -> None:
    """Add one backward's selections to a (layer, direction)'s record: no host sync.

    A cell counts once per (example, step) in which any of its four gates was selected (the
    gate indices are merged into their cell, index mod H, and de-duplicated per row), so a
    count never exceeds the number of selections and one prune_rate threshold means the same
    for LSTM cells as for Linear units. ``selections`` grows by the rows (valid example-steps).
    """
    counts, selections = usage
    if sel.kind == "dense":  # every cell of every row
        counts.add_(n_rows)
    else:
        cells = (sel.index % hid).sort(1).values  # (N, k)
        first = torch.ones_like(cells, dtype=torch.bool)
        first[:, 1:] = cells[:, 1:] != cells[:, :-1]
        counts.index_add_(0, cells.flatten(), first.flatten().to(counts.dtype))
    if selections is not None:
        selections.add_(n_rows)


def _padded_selection(idx: Tensor, steps: Steps, batch: int, sorted_indices) -> Tensor:
    """Debug view of the selections: (T, B, k) gate indices in the caller's batch order, -1
    where a sequence has ended (a Python loop over steps: for tests, not the hot path)."""
    out = idx.new_full((len(steps), batch, idx.shape[1]), -1)
    for t, (off, n) in enumerate(steps):
        rows = torch.arange(n) if sorted_indices is None else sorted_indices[:n].cpu()
        out[t, rows] = idx[off : off + n]
    return out


# --------------------------------------------------------------------------------------------
# The module


class SparseLSTM(nn.LSTM):
    """``nn.LSTM`` whose backward keeps, at every step, only the top-k gate-gradient entries.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
        device, dtype: as ``nn.LSTM``. ``proj_size`` must be 0.
        config: a ``MePropConfig``. ``k`` counts entries of the 4H-wide gate pre-activation
            gradient of one example and step (``per_example``, ``random``) or columns per step
            (``unified``); a (layer, direction) with ``k >= 4 * H`` gets the exact dense
            gradient. ``sparse_bias`` and ``sparse_grad`` apply to both weight matrices and
            both bias vectors as for ``SparseLinear``.

    Inputs and outputs are nn.LSTM's: a (T, B, in) tensor ((B, T, in) with ``batch_first``),
    an unbatched (T, in) one, or a ``PackedSequence``, and optional ``(h0, c0)``; returns
    ``(output, (h_n, c_n))``. After meSimp has shrunk directions to different widths
    (``sizes()``), each layer's output is [forward H_f, backward H_b] and ``h0``, ``c0``,
    ``h_n``, ``c_n`` are sequences of ``num_layers * num_directions`` tensors (B, H_ld) in
    nn.LSTM's order instead of one stacked tensor.

    Attributes:
        usage: ``None``, or ``{(layer, direction): (counts (H,), selections (1,))}`` that
            backward increments: per memory cell, the number of (example, step) rows in which
            any of its four gates was selected (counted once per row, not once per gate), and
            the number of rows. meSimp attaches it.
        debug_selections: ``None``, or a dict that backward fills with
            ``{(layer, direction): idx (T, B, k)}``: the selected gate columns of every step and
            example, in the caller's batch order, -1 past a sequence's end (for tests).

    Example:
        >>> lstm = SparseLSTM(100, 500, bidirectional=True, config=MePropConfig(k=10))
        >>> lstm
        SparseLSTM(100, 500, bidirectional=True, k=10, mode=per_example)
    """

    config: MePropConfig
    usage: dict[Key, tuple[Tensor, Tensor]] | None
    debug_selections: dict | None

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: MePropConfig | None = None,
    ) -> None:
        if not isinstance(config, MePropConfig):
            raise TypeError(
                f"SparseLSTM needs config=MePropConfig(k=...), got {type(config).__name__}"
            )
        _check_no_proj(proj_size)
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size=0,
            device=device,
            dtype=dtype,
        )
        self.config = config
        self.usage = None
        self.debug_selections = None
        self.k_record = KRecord()

    @property
    def last_k(self) -> float | None:
        """The mean k of the latest backward over its steps' rows (None before the first)."""
        return self.k_record.last_k

    # nn.LSTM's cuDNN weight flattening assumes one hidden size; this module never uses it.
    def flatten_parameters(self) -> None:
        return

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def sizes(self) -> dict[Key, int]:
        """The hidden width of every (layer, direction), read off its ``weight_hh``."""
        return {
            (layer, d): getattr(self, param_names(layer, d)[1]).shape[1]
            for layer in range(self.num_layers)
            for d in range(self.num_directions)
        }

    def extra_repr(self) -> str:
        c = self.config
        s = f"{super().extra_repr()}, k={c.k}, mode={c.mode}"
        if c.sparse_bias:
            s += ", sparse_bias=True"
        if c.sparse_grad:
            s += ", sparse_grad=True"
        sizes = self.sizes()
        if any(h != self.hidden_size for h in sizes.values()):
            s += f", sizes={sizes}"
        return s

    # -- states ------------------------------------------------------------------------------

    def _initial_states(self, hx, batch, like, sorted_indices, unbatched):
        """(h0, c0) as lists of (B, H_ld) tensors in the packed (length-sorted) batch order."""
        sizes = list(self.sizes().values())
        count = len(sizes)
        if hx is None:
            zeros = [like.new_zeros(batch, h) for h in sizes]
            return zeros, [z.clone() for z in zeros]
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            raise TypeError(f"hx must be a pair (h0, c0), got {type(hx).__name__}")
        out = []
        for name, state in zip(("h0", "c0"), hx, strict=True):
            parts = list(state.unbind(0)) if isinstance(state, Tensor) else list(state)
            if len(parts) != count:
                raise ValueError(
                    f"{name} must hold num_layers * num_directions = {count} states, "
                    f"got {len(parts)}"
                )
            fixed = []
            for p, h in zip(parts, sizes, strict=True):
                if unbatched:
                    p = p.unsqueeze(0)
                if tuple(p.shape) != (batch, h):
                    want = (count, h) if unbatched else (count, batch, h)
                    got = tuple(state.shape) if isinstance(state, Tensor) else tuple(p.shape)
                    raise ValueError(
                        f"{name} has shape {got}, expected {want} (num_layers * "
                        f"num_directions, batch, hidden); after pruning to different widths "
                        f"pass a sequence of (batch, width) tensors, widths {self.sizes()}"
                    )
                if sorted_indices is not None:
                    p = p.index_select(0, sorted_indices)
                fixed.append(p)
            out.append(fixed)
        return out[0], out[1]

    def _final_states(self, hs, unsorted_indices, unbatched):
        if unsorted_indices is not None:
            hs = [h.index_select(0, unsorted_indices) for h in hs]
        if unbatched:
            hs = [h.squeeze(0) for h in hs]
        if len({h.shape[-1] for h in hs}) == 1:
            return torch.stack(hs)
        return tuple(hs)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, input, hx=None):
        cfg, record = self.config, self.k_record
        if cfg.memory:
            raise ValueError(
                f"SparseLSTM does not support MePropConfig(memory={cfg.memory:g}) yet "
                "(memorized sparse back-propagation is implemented for Linear layers): use "
                "memory=0 for the LSTM, e.g. sparsify_ it with a second config"
            )
        if cfg.warmup and record.calls < cfg.warmup and torch.is_grad_enabled():
            if any(p.requires_grad for p in self.parameters()):
                record.calls += 1  # a warm-up step: nn.LSTM's own forward and backward
                record.last_k = float(4 * self.hidden_size)
                return nn.LSTM.forward(self, input, hx)
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            steps = _steps_from_batch_sizes(batch_sizes.tolist())
            batch = steps[0][1]
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"SparseLSTM expects a 2-D (unbatched) or 3-D input, got {input.dim()}-D "
                    f"shape {tuple(input.shape)}"
                )
            unbatched = input.dim() == 2
            if unbatched:
                input = input.unsqueeze(1)  # (T, 1, in)
            elif self.batch_first:
                input = input.transpose(0, 1)  # (T, B, in)
            n_steps, batch = input.shape[:2]
            if n_steps == 0:
                raise ValueError(f"SparseLSTM got an empty input of shape {tuple(input.shape)}")
            x = input.reshape(n_steps * batch, input.shape[2])  # (T*B, in), time-major rows
            steps = tuple((t * batch, batch) for t in range(n_steps))
            sorted_indices = unsorted_indices = None
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"input has {x.shape[-1]} features per step but SparseLSTM was built with "
                f"input_size={self.input_size}"
            )
        # Under torch.autocast, nn.LSTM runs in the autocast dtype: cast the input, states and
        # weights (autograd ops, so gradients return in the parameters' dtype) and run the
        # layers with autocast off. Outside it, a dtype mismatch is nn.LSTM's error.
        amp = autocast_dtype(x)
        if amp is not None:
            x = autocast_cast(x, amp)
        elif x.dtype != self.weight_ih_l0.dtype:
            w_dtype = self.weight_ih_l0.dtype
            raise ValueError(
                f"SparseLSTM: RNN input dtype ({x.dtype}) does not match weight dtype ({w_dtype}). "
                f"Convert input: input.to({w_dtype}), or convert model: model.to({x.dtype})"
            )
        h0s, c0s = self._initial_states(hx, batch, x, sorted_indices, unbatched)
        if amp is not None:
            h0s = [autocast_cast(h, amp) for h in h0s]
            c0s = [autocast_cast(c, amp) for c in c0s]

        cfg = self.config
        if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                "SparseLSTM does not run under torch.func transforms (grad, vmap, jacrev, ...): "
                "its recurrence writes its states in place; leave the LSTM dense there "
                "(sparsify_(..., filter_fn=...)) or use loss.backward()"
            )
        if cfg.sparse_grad:
            check_not_in_plain_ddp(f"SparseLSTM(k={cfg.k})")
        if cfg.scope == "global" and cfg.mode == "unified":
            # One all-reduce per time step would need the same number of steps on every rank.
            raise ValueError(
                "SparseLSTM does not support MePropConfig(scope='global'): the ranks' batches "
                "have different numbers of time steps; use scope='local' (each rank picks "
                "its own columns) or mode='per_example'"
            )
        dirs = self.num_directions
        # Keep what backward needs only when a backward can come.
        save = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or any(t.requires_grad for t in (*h0s, *c0s))
        )
        no_amp = (
            contextlib.nullcontext()
            if amp is None
            else torch.autocast(x.device.type, enabled=False)
        )
        hs, cs = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                w_ih, w_hh, b_ih, b_hh = (getattr(self, n, None) for n in param_names(layer, d))
                if amp is not None:
                    w_ih, w_hh, b_ih, b_hh = (
                        autocast_cast(p, amp) for p in (w_ih, w_hh, b_ih, b_hh)
                    )
                if not self.bias:
                    b_ih = b_hh = None
                usage = None if self.usage is None else self.usage.get((layer, d))
                debug = None
                if self.debug_selections is not None:
                    debug = DebugSink(self.debug_selections, (layer, d), sorted_indices)
                j = layer * dirs + d
                record = self.k_record
                if cfg.adapt is None:
                    # A fixed k is known now; backward then changes no state outside the graph
                    # (which torch.compile would have to break on).
                    if j == 0:
                        record.last_k = float(min(cfg.k, 4 * w_hh.shape[1]))
                    record = None
                with no_amp:
                    y, h_n, c_n = _LSTMDirectionFn.apply(
                        layer_in, h0s[j], c0s[j], w_ih, w_hh, b_ih, b_hh,
                        steps, d == 1, cfg, usage, debug, record, save,
                    )  # fmt: skip
                outs.append(y)
                hs.append(h_n)
                cs.append(c_n)
            layer_in = outs[0] if dirs == 1 else torch.cat(outs, 1)  # (N, H_f + H_b)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        h_n = self._final_states(hs, unsorted_indices, unbatched)
        c_n = self._final_states(cs, unsorted_indices, unbatched)

        if packed:
            return PackedSequence(layer_in, batch_sizes, sorted_indices, unsorted_indices), (
                h_n,
                c_n,
            )
        out = layer_in.view(len(steps), batch, layer_in.shape[1])
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)


def _check_no_proj(proj_size: int) -> None:
    if proj_size != 0:
        raise ValueError(
            f"SparseLSTM does not support projections (proj_size={proj_size}): build the LSTM "
            "with proj_size=0, or leave it dense (sparsify_(..., filter_fn=...))"
        )


def to_sparse_(lstm: nn.LSTM, config: MePropConfig) -> SparseLSTM:
    """Make an exact ``nn.LSTM`` a ``SparseLSTM`` in place (class swap; Parameters kept)."""
    _check_no_proj(lstm.proj_size)
    swap_class(lstm, SparseLSTM)
    lstm.config = config
    lstm.usage = None
    lstm.debug_selections = None
    lstm.k_record = KRecord()
    return lstm


def to_dense_(lstm: SparseLSTM) -> nn.LSTM:
    """Turn a ``SparseLSTM`` back into an ``nn.LSTM`` in place.

    nn.LSTM has one hidden size: a model pruned to the same width everywhere gets that width
    as its ``hidden_size``; different widths per layer or direction are an error.
    """
    widths = set(lstm.sizes().values())
    if len(widths) != 1:
        raise ValueError(
            f"cannot make an nn.LSTM of a SparseLSTM whose layers/directions have different "
            f"widths {lstm.sizes()}: keep it a SparseLSTM (with config k >= 4 * width its "
            "gradients are the dense ones)"
        )
    lstm.hidden_size = widths.pop()
    swap_class(lstm, nn.LSTM)
    del lstm.config, lstm.usage, lstm.debug_selections, lstm.k_record
    return lstm
