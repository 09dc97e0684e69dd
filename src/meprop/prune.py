"""Physical removal of units: a producer loses output rows, its consumers lose input columns.

Each function puts new, smaller Parameters on the module and returns the "cuts" it made
(old Parameter, new Parameter, dimension, kept indices). ``update_optimizer_`` then swaps the
new Parameters into the optimizer and slices (or resets) their state, so the optimizer holds
exactly the model's parameters again. New Parameter objects, rather than a new ``.data`` on the
old ones, because autograd caches a leaf's shape in its gradient accumulator, which hooks
(DDP's among them) keep alive. Module attributes (``out_features``, ...) follow the new shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "units",
    "prune_out_",
    "prune_in_",
    "prune_norm_",
    "update_optimizer_",
    "reset_optimizer_state_",
    "sync_shapes_",
]

# (old parameter, new parameter, dim, kept indices) for every tensor a pruning touched.
Cut = tuple[nn.Parameter, nn.Parameter, int, Tensor]


def check_keep(keep: Tensor, size: int, what: str) -> Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0:
        raise ValueError(f"cannot remove every unit of {what}: keep at least one")
    if int(keep.min()) < 0 or int(keep.max()) >= size:
        raise IndexError(f"unit index out of range for {what} of width {size}: {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise ValueError(f"duplicate unit indices for {what}: {keep.tolist()}")
    return keep


def slice_param(module: nn.Module, name: str, dim: int, keep: Tensor) -> Cut:
    old = getattr(module, name)
    keep = keep.to(old.device)
    new = nn.Parameter(old.detach().index_select(dim, keep), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return (old, new, dim, keep)


def units(layer: nn.Linear | nn.Conv2d) -> int:
    """The units a layer produces, its weight's first dimension: a Linear's outputs, a
    Conv2d's filters."""
    return layer.weight.shape[0]


def _check_ungrouped(conv: nn.Conv2d, what: str) -> None:
    if conv.groups != 1:
        raise ValueError(
            f"cannot remove {what} of a {type(conv).__name__} with groups={conv.groups}: its "
            "channels are tied group by group (depthwise: output to input); only groups=1 "
            "convolutions are shrunk"
        )


def prune_out_(layer: nn.Linear | nn.Conv2d, keep: Tensor) -> list[Cut]:
    """Keep only the output units ``keep`` of a Linear (rows of its weight and bias) or the
    filters ``keep`` of a Conv2d (its weight's (C_out, C_in, kh, kw) slices along C_out, and
    the bias; ``groups=1`` only)."""
    conv = isinstance(layer, nn.Conv2d)
    if conv:
        _check_ungrouped(layer, "filters")
    keep = check_keep(keep, units(layer), f"{type(layer).__name__} outputs")
    cuts = [slice_param(layer, "weight", 0, keep)]
    if layer.bias is not None:
        cuts.append(slice_param(layer, "bias", 0, keep))
    if conv:
        layer.out_channels = keep.numel()
    else:
        layer.out_features = keep.numel()
    return cuts


def prune_in_(layer: nn.Linear | nn.Conv2d, keep: Tensor, block: int = 1) -> list[Cut]:
    """Keep only the inputs ``keep`` of a Linear (columns of its weight) or the input channels
    ``keep`` of a Conv2d (``groups=1`` only).

    ``block``: a Linear that reads a flattened (C, H, W) feature map (``nn.Flatten`` after a
    convolution) has H * W = ``block`` columns per channel, channel-major; ``keep`` then
    names channels, and their ``block`` columns each are kept.
    """
    if isinstance(layer, nn.Conv2d):
        _check_ungrouped(layer, "input channels")
        keep = check_keep(keep, layer.in_channels, f"{type(layer).__name__} input channels")
        layer.in_channels = keep.numel()
        return [slice_param(layer, "weight", 1, keep)]
    if block < 1 or layer.in_features % block:
        raise ValueError(
            f"{type(layer).__name__} with {layer.in_features} inputs cannot read channels of "
            f"{block} columns each"
        )
    keep = check_keep(keep, layer.in_features // block, f"{type(layer).__name__} inputs")
    if block > 1:  # channel c's columns: c * block ... c * block + block - 1
        keep = (keep[:, None] * block + torch.arange(block, device=keep.device)).flatten()
    layer.in_features = keep.numel()
    return [slice_param(layer, "weight", 1, keep)]


def prune_norm_(norm: nn.Module, keep: Tensor) -> list[Cut]:
    """Slice a LayerNorm over the last dimension, or a BatchNorm1d/2d, to the features
    (channels) ``keep``."""
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"can only slice a LayerNorm over one dimension, got {norm}")
        size = norm.normalized_shape[0]
    elif isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d):
        size = norm.num_features
    else:
        raise TypeError(
            f"cannot slice {type(norm).__name__}: only LayerNorm, BatchNorm1d and BatchNorm2d"
        )
    keep = check_keep(keep, size, type(norm).__name__)
    cuts = [
        slice_param(norm, n, 0, keep) for n in ("weight", "bias") if getattr(norm, n) is not None
    ]
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (keep.numel(),)
    else:
        norm.num_features = keep.numel()
        for name in ("running_mean", "running_var"):
            buf = getattr(norm, name)
            if buf is not None:
                setattr(norm, name, buf.index_select(0, keep.to(buf.device)))
    return cuts


def update_optimizer_(optimizer: torch.optim.Optimizer, cuts: list[Cut], slice_state: bool) -> None:
    """Put the new Parameters in the optimizer in place of the old ones; carry their state.

    With ``slice_state``, each per-parameter state tensor (moments, sums, momentum buffers) is
    sliced like its parameter and scalars such as Adam's ``step`` are kept, so the update goes on
    where it was; this works for any optimizer whose state tensors have the parameter's shape.
    Otherwise all state is cleared (``reset_optimizer_state_``). Cuts are applied in order, so
    a weight cut twice (rows, then columns) ends with the last Parameter.
    """
    for old, new, dim, keep in cuts:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state and slice_state:
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() == old.dim() and value.dim() > dim:
                    state[key] = value.index_select(dim, keep.to(value.device))
            optimizer.state[new] = state
    if not slice_state:
        reset_optimizer_state_(optimizer)


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
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            module.out_channels, module.in_channels = module.weight.shape[:2]
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            source = module.weight if module.weight is not None else module.running_mean
            if source is not None:
                module.num_features = source.shape[0]
