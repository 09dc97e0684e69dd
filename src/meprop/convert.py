"""Swap ``nn.Linear`` modules for ``SparseLinear`` (and ``nn.LSTM`` for ``SparseLSTM``) in
place, and back.

The swap changes the module's class and adds its config, nothing else: the Parameter objects,
hooks and attributes stay, so an optimizer built before the swap keeps updating the same
tensors, state_dict keys do not change, and a root module (``model`` itself an ``nn.Linear``)
can be converted in place too.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import MePropConfig
from .lstm import SparseLSTM, to_dense_, to_sparse_
from .nn import SparseLinear

__all__ = ["sparsify_", "densify_", "hidden_layers"]

FilterFn = Callable[[nn.Module, str], bool]


def sparsify_(model: nn.Module, config: MePropConfig, filter_fn: FilterFn | None = None):
    """Make every ``nn.Linear`` of ``model`` (itself included) a ``SparseLinear``, in place.

    Exact ``nn.LSTM`` modules become ``SparseLSTM`` the same way (top-k of the gate gradients at
    every step; ``proj_size`` must be 0).

    Args:
        model: any module.
        config: the ``MePropConfig`` the converted layers use. Layers that already are
            ``SparseLinear`` and pass the filter take the new config.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; only modules for which it
            returns True are converted (the root's name is ``""``). ``None`` converts all.
            The paper sparsifies the hidden layers and keeps the output layer dense: see
            ``hidden_layers``.

    Only exact ``nn.Linear`` instances are converted: subclasses of it may compute something
    else in ``forward`` (``nn.MultiheadAttention``'s ``out_proj`` is never called as a module).

    Returns:
        ``model``.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> _ = sparsify_(mlp, MePropConfig(k=20), filter_fn=hidden_layers(mlp))
        >>> [type(m).__name__ for m in mlp]
        ['SparseLinear', 'ReLU', 'Linear']
    """
    if not isinstance(config, MePropConfig):
        raise TypeError(f"config must be a MePropConfig, got {type(config).__name__}")
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, SparseLinear, nn.LSTM, SparseLSTM):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if type(module) is nn.Linear:
            module.__class__ = SparseLinear
            module.usage = None
        elif type(module) is nn.LSTM:
            to_sparse_(module, config)
        module.config = config
    return model


def densify_(model: nn.Module, filter_fn: FilterFn | None = None):
    """Turn every ``SparseLinear`` of ``model`` (itself included) back into ``nn.Linear``, and
    every ``SparseLSTM`` into ``nn.LSTM`` (an error if meSimp left its directions at different
    widths, which nn.LSTM cannot represent).

    Args:
        model: any module.
        filter_fn: as for ``sparsify_``.

    Returns:
        ``model``.
    """
    for name, module in model.named_modules():
        if type(module) is SparseLinear and (filter_fn is None or filter_fn(module, name)):
            module.__class__ = nn.Linear
            del module.config, module.usage
        elif type(module) is SparseLSTM and (filter_fn is None or filter_fn(module, name)):
            to_dense_(module)
    return model


def hidden_layers(model: nn.Module) -> FilterFn:
    """A filter that accepts every ``nn.Linear`` of ``model`` except the last one registered.

    This is the paper's convention: meProp on the hidden layers, a dense output layer (whose
    width, e.g. 10 classes, is close to k anyway).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = linears[-1] if linears else None
    return lambda module, name: name != last
