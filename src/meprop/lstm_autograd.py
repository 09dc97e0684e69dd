"""One (layer, direction) of ``SparseLSTM`` over the whole sequence: its autograd Function.

The forward runs the recurrence step by step after one GEMM for the input projection of all
steps; the backward goes back in time keeping the top-k of each step's gate gradient dG_t and
ends with one row-sparse product per weight over all rows (``meprop.lstm`` gives the method).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .adaptive import KRecord, batch_k, row_ks
from .grads import weight_grad
from .ops import (
    Selection,
    column_scores,
    compact_products,
    kernel_module,
    select_columns,
    select_rows,
)

__all__ = ["Key", "Steps", "DebugSink", "LSTMDirectionFn", "steps_from_batch_sizes"]

Key = tuple[int, int]  # (layer, direction): direction 0 runs forward in time, 1 backward


# --------------------------------------------------------------------------------------------
# Layout. All tensors inside are "packed": time-major rows, step t holding the rows
# [offset_t, offset_t + n_t) with n_t non-increasing in t (PackedSequence's layout: the batch
# sorted by length, so the sequences still running at t are the first n_t). A padded input
# without lengths is the special case n_t = B. Each sequence's state thus stops at its own
# last step, and the reverse direction starts at it, with no masking and no work on padding.

Steps = tuple[tuple[int, int], ...]  # (offset, n) per time step, in time order


def steps_from_batch_sizes(batch_sizes: Sequence[int]) -> Steps:
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


class LSTMDirectionFn(torch.autograd.Function):
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
        need_x, need_h0, need_c0, need_wih, need_whh = ctx.needs_input_grad[:5]
        need_b = ctx.has_bias and any(ctx.needs_input_grad[5:7])
        hid = w_hh.shape[1]
        n4, n_rows, batch = 4 * hid, acts.shape[0], dhn.shape[0]
        mult, dc_from_h = _multipliers(acts, c_prev, tanh_c, hid)
        dense = cfg.k >= n4
        kern = None if dense else kernel_module(cfg.backend, acts)  # compiled kernels or None
        adapt = None if dense else cfg.adapt
        if adapt is not None and torch.compiler.is_compiling():
            _adaptive_untraced()
        record = ctx.record if ctx.record is not None or adapt is None else KRecord()
        kept = [0.0]  # adaptive: the k's kept, summed over the steps' rows
        dgates, idx_t, val_t, dh, dc = _through_time(
            ctx, dy, dhn, dcn, acts, mult, dc_from_h, w_hh, kern, adapt, record, kept
        )
        if ctx.record is not None:  # adaptive k (a fixed k's last_k is set in forward)
            record.last_k = (
                kept[0] / n_rows if adapt is not None and n_rows else float(min(cfg.k, n4))
            )
        if dense:
            sel = Selection("all")
            dx, dw_ih, dw_hh = _dense_products(dgates, w_ih, x, h_prev, need_x, need_wih,
                                               need_whh, cfg.sparse_grad)  # fmt: skip
        else:
            # dG~ of all steps in index/value form (N, k) (a unified step's columns repeated
            # on each of its rows): the same row-sparse products as the Linear path, each over
            # all N rows at once.
            sel = Selection("rows", torch.cat(idx_t), torch.cat(val_t))
            dx, dw_ih, dw_hh = _final_products(
                sel, w_ih, x, h_prev, kern, need_x, need_wih, need_whh, cfg.sparse_grad
            )
        db = _bias_grad(dgates, sel, cfg.sparse_bias) if need_b else None
        if ctx.usage is not None:
            _record_cells(ctx.usage, sel, hid, n_rows)
        if ctx.debug is not None and sel.kind == "rows":
            dbg = ctx.debug
            dbg.store[dbg.key] = _padded_selection(sel.index, steps, batch, dbg.sorted_indices)
        db_ih = db if need_b and ctx.needs_input_grad[5] else None
        db_hh = db if need_b and ctx.needs_input_grad[6] else None
        return (dx, dh if need_h0 else None, dc if need_c0 else None, dw_ih, dw_hh, db_ih, db_hh,
                *(None,) * 8)  # fmt: skip


def _bias_grad(dgates: Tensor, sel: Selection, sparse_bias: bool) -> Tensor:
    """The bias gradient (4H,): from the full gate gradients, or (``sparse_bias``) from the
    selected entries only."""
    if sparse_bias and sel.kind == "rows":
        return dgates.new_zeros(dgates.shape[1]).index_add_(
            0, sel.index.flatten(), sel.values.flatten()
        )
    return dgates.sum(0)


def _multipliers(acts: Tensor, c_prev: Tensor, tanh_c: Tensor, hid: int):
    """Derivative multipliers of all steps at once (a few passes over (N, 4H) instead of many
    small ops per step), so that a step's gate gradient is one multiplication:
    dG = [dc, dc, dc, dh] * mult (n, 4H), with dh the hidden-state gradient at that step and dc
    the cell gradient after adding dh * o * (1 - tanh(c)^2). Returns mult (N, 4H) and
    o (1 - tanh(c)^2) (N, H)."""
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
    return mult, torch.addcmul(o, o, tanh_c * tanh_c, value=-1)


def _through_time(ctx, dy, dhn, dcn, acts, mult, dc_from_h, w_hh, kern, adapt, record, kept):
    """The recurrence backward, last step first: each step's full gate gradient dG_t (into
    ``dgates`` (N, 4H)), its top-k (per step: selected columns (n, k) and values; None where
    dense) and the hidden-state gradient it passes back through the selection. Returns
    dgates, the selections' indices and values per step, and dh0, dc0 (B, H)."""
    steps, reverse, cfg = ctx.steps, ctx.reverse, ctx.config
    hid, batch = w_hh.shape[1], dhn.shape[0]
    dense = cfg.k >= 4 * hid
    f = acts[:, hid : 2 * hid]
    dgates = torch.empty_like(acts)  # the full dG of every step (N, 4H)
    idx_t: list = [None] * len(steps)
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
            idx_t[t], val_t[t], dh_p = _select_step(dg, cfg.k, cfg.mode, kern, w_hh, adapt,
                                                    record, kept)  # fmt: skip
        dh = dh_p if n == batch else torch.cat([dh_p, dh[n:]])
        dc = dc_p if n == batch else torch.cat([dc_p, dc[n:]])
    return dgates, idx_t, val_t, dh, dc


def _dense_products(dgates, w_ih, x, h_prev, need_x, need_wih, need_whh, sparse_grad):
    """dx, dW_ih, dW_hh from the full gate gradients of all steps (k >= 4H)."""
    n4 = dgates.shape[1]
    dx = dgates @ w_ih if need_x else None
    dw_ih = dgates.t() @ x if need_wih else None
    dw_hh = dgates.t() @ h_prev if need_whh else None
    if sparse_grad:
        rows = torch.arange(n4, device=dgates.device)
        dw_ih = None if dw_ih is None else weight_grad(rows, dw_ih, n4, True)
        dw_hh = None if dw_hh is None else weight_grad(rows, dw_hh, n4, True)
    return dx, dw_ih, dw_hh


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
    if sel.kind == "all":  # every cell of every row
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
