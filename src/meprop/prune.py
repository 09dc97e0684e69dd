"""Physical removal of units: a producer loses output rows, its consumers lose input columns.

Each function replaces the *data* of the module's Parameters (``p.data = p.data[keep]``), so the
Parameter objects survive: an optimizer keeps holding exactly the model's parameters, and
``slice_optimizer_state_`` (or a reset) brings its per-parameter state to the new shapes.
Module attributes (``out_features``, ``normalized_shape``, ...) follow the new shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "prune_out_",
    "prune_in_",
    "prune_norm_",
    "slice_optimizer_state_",
    "reset_optimizer_state_",
    "sync_shapes_",
]

# (parameter, dim, kept indices) for every tensor a pruning touched: optimizer state follows.
Cut = tuple[nn.Parameter, int, Tensor]


def _check_keep(keep: Tensor, size: int, what: str) -> Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every unit of {what}: keep at least one")
    if int(keep.min()) < 0 or int(keep.max()) >= size:
        raise IndexError(f"unit index out of range for {what} of width {size}: {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise ValueError(f"duplicate unit indices for {what}: {keep.tolist()}")
    return keep


def _slice_param(p: nn.Parameter, dim: int, keep: Tensor) -> Cut:
    p.data = p.data.index_select(dim, keep.to(p.device))
    p.grad = None  # a gradient of the old shape would break the next step
    return (p, dim, keep)


def prune_out_(layer: nn.Linear, keep: Tensor) -> list[Cut]:
    """Keep only the output units ``keep`` of a Linear: rows of its weight and bias."""
    keep = _check_keep(keep, layer.out_features, f"{type(layer).__name__} outputs")
    cuts = [_slice_param(layer.weight, 0, keep)]
    if layer.bias is not None:
        cuts.append(_slice_param(layer.bias, 0, keep))
    layer.out_features = keep.numel()
    return cuts


def prune_in_(layer: nn.Linear, keep: Tensor) -> list[Cut]:
    """Keep only the input columns ``keep`` of a Linear's weight."""
    keep = _check_keep(keep, layer.in_features, f"{type(layer).__name__} inputs")
    layer.in_features = keep.numel()
    return [_slice_param(layer.weight, 1, keep)]


def prune_norm_(norm: nn.Module, keep: Tensor) -> list[Cut]:
    """Slice a LayerNorm over the last dimension, or a BatchNorm1d, to the features ``keep``."""
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"can only slice a LayerNorm over one dimension, got {norm}")
        size = norm.normalized_shape[0]
    elif isinstance(norm, nn.BatchNorm1d):
        size = norm.num_features
    else:
        raise TypeError(f"cannot slice {type(norm).__name__}: only LayerNorm and BatchNorm1d")
    keep = _check_keep(keep, size, type(norm).__name__)
    cuts = [_slice_param(p, 0, keep) for p in (norm.weight, norm.bias) if p is not None]
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (keep.numel(),)
    else:
        norm.num_features = keep.numel()
        for name in ("running_mean", "running_var"):
            buf = getattr(norm, name)
            if buf is not None:
                setattr(norm, name, buf.index_select(0, keep.to(buf.device)))
    return cuts


def slice_optimizer_state_(optimizer: torch.optim.Optimizer, cuts: list[Cut]) -> None:
    """Slice each per-parameter state tensor (moments, sums, buffers) like its parameter.

    Scalars such as Adam's ``step`` are kept, so the update continues where it was. Works for
    any optimizer whose per-parameter state tensors have the parameter's shape.
    """
    for p, dim, keep in cuts:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > dim and value.dim() == p.dim():
                state[key] = value.index_select(dim, keep.to(value.device))


def reset_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Forget all per-parameter history (moments and step counts), as a fresh optimizer would.

    Hyper-parameters, learning rates set by schedulers included, are kept.
    """
    optimizer.state.clear()


def sync_shapes_(model: nn.Module) -> None:
    """Set module size attributes from their parameters' shapes (after loading shrunk weights)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.BatchNorm1d) and module.weight is not None:
            module.num_features = module.weight.shape[0]
