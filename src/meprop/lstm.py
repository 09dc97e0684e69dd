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

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .adaptive import KRecord
from .config import MePropConfig, check_row_config
from .grads import check_not_in_plain_ddp
from .lstm_autograd import DebugSink, Key, LSTMDirectionFn, steps_from_batch_sizes
from .nn import swap_class
from .ops import (
    autocast_cast,
    autocast_dtype,
)

__all__ = ["SparseLSTM"]


def param_names(layer: int, direction: int) -> tuple[str, str, str, str]:
    """nn.LSTM's parameter names of one (layer, direction)."""
    s = f"l{layer}{'_reverse' if direction else ''}"
    return f"weight_ih_{s}", f"weight_hh_{s}", f"bias_ih_{s}", f"bias_hh_{s}"


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
        check_row_config(config, "SparseLSTM")
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
        x, steps, batch, sorted_indices, unsorted_indices, unbatched = self._rows(input)
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
        self._check_config()
        # Keep what backward needs only when a backward can come.
        save = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or any(t.requires_grad for t in (*h0s, *c0s))
        )
        layer_in, hs, cs = self._layers(x, h0s, c0s, steps, amp, sorted_indices, save)
        h_n = self._final_states(hs, unsorted_indices, unbatched)
        c_n = self._final_states(cs, unsorted_indices, unbatched)
        if packed:
            out = PackedSequence(layer_in, input.batch_sizes, sorted_indices, unsorted_indices)
            return out, (h_n, c_n)
        out = layer_in.view(len(steps), batch, layer_in.shape[1])
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)

    def _check_config(self) -> None:
        """Refuse what the forward cannot serve: torch.func, plain DDP with ``sparse_grad``,
        global scope."""
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

    def _rows(self, input):
        """The input as time-major rows ``x`` (N, input_size) with its ``steps`` ((row
        offset, batch size) per time step), the batch size, the packed sequence's sorted and
        unsorted indices (None unpacked), and whether it was unbatched."""
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            steps = steps_from_batch_sizes(batch_sizes.tolist())
            batch, unbatched = steps[0][1], False
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
        return x, steps, batch, sorted_indices, unsorted_indices, unbatched

    def _layers(self, x, h0s, c0s, steps, amp, sorted_indices, save):
        """Every layer and direction in turn: the last layer's output rows, and each
        direction's final hidden and cell states."""
        cfg, dirs = self.config, self.num_directions
        no_amp = nullcontext() if amp is None else torch.autocast(x.device.type, enabled=False)
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
                    y, h_n, c_n = LSTMDirectionFn.apply(
                        layer_in, h0s[j], c0s[j], w_ih, w_hh, b_ih, b_hh,
                        steps, d == 1, cfg, usage, debug, record, save,
                    )  # fmt: skip
                outs.append(y)
                hs.append(h_n)
                cs.append(c_n)
            layer_in = outs[0] if dirs == 1 else torch.cat(outs, 1)  # (N, H_f + H_b)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        return layer_in, hs, cs


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
