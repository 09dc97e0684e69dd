"""meSimp for LSTMs: removing memory cells (Sun et al., TKDE).

While training, ``SparseLSTM``'s backward merges the selected gate indices of each step into
the usage record of their memory cells (index mod H; ``SparseLSTM.usage``). Pruning a cell
removes its four gate rows (i, f, g, o) of one (layer, direction), its column in the
recurrent matrix and the next layer's input column (``prune_lstm_cells_``), or, for the last
layer, the input column of the Linear modules that read the LSTM's output
(``lstm_output_columns`` says which).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .lstm import Key, SparseLSTM, param_names
from .prune import Cut, check_keep, prune_in_, slice_param

__all__ = ["prune_lstm_cells_", "lstm_output_columns"]


def _check_key(lstm: nn.Module, layer: int, direction: int) -> None:
    if not isinstance(lstm, SparseLSTM):
        raise TypeError(
            f"cell pruning needs a SparseLSTM (per-direction widths), got {type(lstm).__name__}:"
            " convert it with sparsify_ first"
        )
    if not 0 <= layer < lstm.num_layers:
        raise IndexError(f"layer must be in [0, {lstm.num_layers}), got {layer}")
    if not 0 <= direction < lstm.num_directions:
        raise IndexError(f"direction must be in [0, {lstm.num_directions}), got {direction}")


def _layer_columns(sizes: dict[Key, int], layer: int, direction: int, keep: Tensor) -> Tensor:
    """Columns of layer ``layer``'s output [forward H_f, backward H_b] kept when ``direction``
    keeps only the cells ``keep``."""
    h_f = sizes[(layer, 0)]
    total = h_f + sizes.get((layer, 1), 0)
    start = 0 if direction == 0 else h_f
    width = sizes[(layer, direction)]
    return torch.cat([torch.arange(start), start + keep.cpu(), torch.arange(start + width, total)])


def lstm_output_columns(lstm: SparseLSTM, direction: int, keep: Tensor) -> Tensor:
    """Columns of the LSTM's output (its last layer, [forward H_f, backward H_b]) that remain
    when that layer's ``direction`` keeps only the cells ``keep``: the input columns a consumer
    Linear keeps (``meprop.prune.prune_in_``). Call it before pruning (it reads the widths).
    """
    layer = lstm.num_layers - 1
    _check_key(lstm, layer, direction)
    sizes = lstm.sizes()
    keep = check_keep(keep, sizes[(layer, direction)], f"LSTM layer {layer} cells")
    return _layer_columns(sizes, layer, direction, keep)


def prune_lstm_cells_(
    lstm: SparseLSTM,
    layer: int,
    direction: int,
    keep: Tensor,
    consumers: Sequence[nn.Linear] = (),
) -> list[Cut]:
    """Keep only the memory cells ``keep`` of one (layer, direction); returns the cuts.

    Removes each other cell's four gate rows (g * H + j, g = i, f, g, o) of weight_ih,
    weight_hh, bias_ih and bias_hh, its column of weight_hh, and its input column in the next
    layer's weight_ih (both directions; the backward half starts at H_f). For the last layer,
    ``consumers`` (Linear modules reading the LSTM output) lose the matching input columns.
    Cuts are (old Parameter, new Parameter, dim, kept indices), as in ``meprop.prune``; pass
    them to ``update_optimizer_``. A usage record of that (layer, direction) is sliced too.
    """
    _check_key(lstm, layer, direction)
    sizes = lstm.sizes()
    hid = sizes[(layer, direction)]
    keep = check_keep(keep, hid, f"LSTM layer {layer} direction {direction} cells")
    gate_rows = (torch.arange(4).unsqueeze(1) * hid + keep.cpu().unsqueeze(0)).flatten()
    w_ih, w_hh, b_ih, b_hh = param_names(layer, direction)
    cuts = [
        slice_param(lstm, w_ih, 0, gate_rows),
        slice_param(lstm, w_hh, 0, gate_rows),
        slice_param(lstm, w_hh, 1, keep),  # the cell's own recurrent column
    ]
    if lstm.bias:
        cuts += [slice_param(lstm, b_ih, 0, gate_rows), slice_param(lstm, b_hh, 0, gate_rows)]
    cols = _layer_columns(sizes, layer, direction, keep)
    if layer + 1 < lstm.num_layers:
        for d in range(lstm.num_directions):
            cuts.append(slice_param(lstm, param_names(layer + 1, d)[0], 1, cols))
    else:
        for consumer in consumers:
            cuts += prune_in_(consumer, cols)
    if lstm.usage is not None and (layer, direction) in lstm.usage:
        counts, selections = lstm.usage[(layer, direction)]
        lstm.usage[(layer, direction)] = (counts[keep.to(counts.device)], selections)
    return cuts
