"""Swap layers for their meProp versions in place, and back, through a registry of layer types.

``nn.Linear`` -> ``SparseLinear``, ``nn.LSTM`` -> ``SparseLSTM``, ``nn.Conv2d`` ->
``SparseConv2d`` and Hugging Face's GPT-2-style ``transformers.pytorch_utils.Conv1D`` ->
``SparseConv1D`` are registered here; a new layer type is one ``register_layer`` call (as
torchao's ``quantize_`` maps config types to handlers), not an edit of a chain of cases.

The swap changes the module's class and adds its config, nothing else: the Parameter objects,
their layout, hooks and attributes stay, so an optimizer built before the swap keeps updating
the same tensors, state_dicts load into the original model, and a root module (``model``
itself an ``nn.Linear``) can be converted in place too.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .adaptive import KRecord
from .config import MePropConfig, check_row_config
from .conv import SparseConv2d, check_conv_config
from .lstm import SparseLSTM, to_dense_, to_sparse_
from .nn import SparseLinear, base_class, swap_class

__all__ = ["sparsify_", "densify_", "hidden_layers", "converted", "register_layer", "number_depths"]

FilterFn = Callable[[nn.Module, str], bool]

# Lazy layers of registered types: converting one before its first forward is an error.
_LAZY = (nn.LazyLinear, nn.LazyConv2d)


@dataclass(frozen=True)
class LayerHandler:
    """How one dense layer type becomes its meProp version in place, and back.

    ``to_sparse(module, config)`` swaps a dense module; ``to_dense(module)`` swaps it back;
    ``check(config)`` raises for configs the type cannot take (before any swap or new config).
    """

    dense: type
    sparse: type
    to_sparse: Callable[[nn.Module, MePropConfig], None]
    to_dense: Callable[[nn.Module], None]
    check: Callable[[MePropConfig], None] | None = None


_BY_DENSE: dict[type, LayerHandler] = {}
_BY_SPARSE: dict[type, LayerHandler] = {}
# Layer types of optional libraries, registered once their module is imported (a model cannot
# hold an instance before): module name -> function registering its handlers.
_PENDING: dict[str, Callable[[], None]] = {}


def register_layer(
    dense: type,
    sparse: type,
    to_sparse: Callable[[nn.Module, MePropConfig], None],
    to_dense: Callable[[nn.Module], None],
    check: Callable[[MePropConfig], None] | None = None,
) -> None:
    """Make ``sparsify_`` convert exact (or parametrized) instances of ``dense`` with
    ``to_sparse(module, config)`` (which must leave an instance of ``sparse`` whose ``config``
    is ``config``; ``meprop.nn.swap_class`` keeps a parametrization) and ``densify_`` turn
    instances of ``sparse`` back with ``to_dense(module)``; ``check(config)``, if given, raises
    for configs the type cannot take."""
    handler = LayerHandler(dense, sparse, to_sparse, to_dense, check)
    _BY_DENSE[dense] = _BY_SPARSE[sparse] = handler


def _dense_handler(module: nn.Module) -> LayerHandler | None:
    """The handler converting ``module``: by its exact type (a subclass may compute something
    else in forward), looking through the class ``torch.nn.utils.parametrize`` wraps a
    parametrized module in (whose forward is the original's)."""
    return _BY_DENSE.get(base_class(module))


def _sparse_handler(module: nn.Module) -> LayerHandler | None:
    """The handler of a meProp layer: by what it is, the first registered meProp type in its
    class's MRO (a parametrized ``SparseLinear`` is a subclass of it)."""
    for cls in type(module).__mro__:
        handler = _BY_SPARSE.get(cls)
        if handler is not None:
            return handler
    return None


def _handlers() -> None:
    """Register the handlers of optional libraries that are imported by now."""
    for module_name in [m for m in _PENDING if m in sys.modules]:
        _PENDING.pop(module_name)()


def _swap_class(sparse: type) -> Callable[[nn.Module, MePropConfig], None]:
    def to_sparse(module: nn.Module, config: MePropConfig) -> None:
        swap_class(module, sparse)
        module.config = config
        module.usage = None
        module.k_record = KRecord()

    return to_sparse


def _unswap_class(dense: type) -> Callable[[nn.Module], None]:
    def to_dense(module: nn.Module) -> None:
        swap_class(module, dense)
        del module.config, module.usage, module.k_record

    return to_dense


register_layer(
    nn.Linear,
    SparseLinear,
    _swap_class(SparseLinear),
    _unswap_class(nn.Linear),
    lambda config: check_row_config(config, "nn.Linear"),
)
register_layer(
    nn.LSTM, SparseLSTM, to_sparse_, to_dense_, lambda config: check_row_config(config, "nn.LSTM")
)
register_layer(
    nn.Conv2d, SparseConv2d, _swap_class(SparseConv2d), _unswap_class(nn.Conv2d), check_conv_config
)


def _register_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    from .nn import sparse_conv1d_class

    sparse = sparse_conv1d_class()
    register_layer(Conv1D, sparse, _swap_class(sparse), _unswap_class(Conv1D), _check_conv1d)


def _check_conv1d(config: MePropConfig) -> None:
    check_row_config(config, "Conv1D (GPT-2's linear maps)")
    if config.sparse_grad:
        raise ValueError(
            "sparse_grad=True is not supported for Conv1D layers (weight stored (in, out): a "
            "row-sparse gradient of W^T is column-sparse); use sparse_grad=False or leave them "
            "dense with filter_fn"
        )


_PENDING["transformers.pytorch_utils"] = _register_conv1d


def _check_filter(filter_fn: FilterFn | None) -> None:
    if filter_fn is None:
        return
    try:
        sig = inspect.signature(filter_fn)
    except (TypeError, ValueError):  # builtins without a signature: called as they are
        return
    try:
        sig.bind(nn.Identity(), "")
    except TypeError:
        raise TypeError(
            f"filter_fn must take two arguments (module, qualified_name), got {filter_fn!r} "
            f"with signature {sig}: e.g. filter_fn=lambda module, name: 'mlp' in name"
        ) from None


def sparsify_(model: nn.Module, config: MePropConfig, filter_fn: FilterFn | None = None):
    """Make every registered layer of ``model`` (itself included) its meProp version, in place.

    ``nn.Linear`` -> ``SparseLinear``; ``nn.LSTM`` -> ``SparseLSTM`` (top-k of the gate
    gradients at every step; ``proj_size`` must be 0); ``nn.Conv2d`` -> ``SparseConv2d`` (top-k
    output channels; ``meprop.conv.check_conv_config`` refuses what it cannot take); Hugging
    Face ``Conv1D`` (GPT-2) -> ``meprop.nn.SparseConv1D``; other types through
    ``register_layer``.

    Args:
        model: any module.
        config: the ``MePropConfig`` the converted layers use. Layers that already are meProp
            layers and pass the filter take the new config.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; only modules for which it
            returns True are converted (the root's name is ``""``). ``None`` converts all.
            The paper sparsifies the hidden layers and keeps the output layer dense: see
            ``hidden_layers``.

    Only exact instances of a registered type are converted: subclasses may compute something
    else in ``forward`` (``nn.MultiheadAttention``'s ``out_proj`` is never called as a module).
    Parametrized ones (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ...)
    are converted and stay parametrized: meProp's backward gives the parametrized weight's
    gradient, the parametrization's backward takes it on to its tensors. A ``UserWarning``
    says when nothing was converted, naming the layers there; ``converted(model)`` lists the
    meProp layers. An uninitialised ``nn.LazyLinear`` or ``nn.LazyConv2d`` that passes the filter
    is an error (run a forward pass first: it then becomes an ``nn.Linear`` / ``nn.Conv2d``).

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
    _check_filter(filter_fn)
    _handlers()
    todo = _to_convert(model, filter_fn)
    for handler in {h.dense: h for _, h in todo}.values():  # every check before any swap
        if handler.check is not None:
            handler.check(config)
    for module, handler in todo:
        if not isinstance(module, handler.sparse):
            handler.to_sparse(module, config)
        else:  # already a meProp layer: the new config only
            module.config = config
    number_depths(model)
    if not todo:
        warnings.warn(_nothing_converted(model, filter_fn), UserWarning, stacklevel=2)
    return model


def _to_convert(model: nn.Module, filter_fn: FilterFn | None) -> list:
    """(module, handler) of every registered layer of ``model`` that passes the filter; an
    uninitialised lazy layer there is an error."""
    todo, lazy = [], []
    for name, module in model.named_modules():
        handler = _sparse_handler(module) or _dense_handler(module)
        uninitialised = isinstance(module, _LAZY)
        if handler is None and not uninitialised:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if uninitialised:
            lazy.append((name or "<root>", type(module).__name__))
        else:
            todo.append((module, handler))
    if lazy:
        names = [n for n, _ in lazy]
        kinds = "/".join(f"nn.{t}" for t in sorted({t for _, t in lazy}))
        raise ValueError(
            f"sparsify_: {names} are uninitialised {kinds} layers: run one forward pass "
            "first (they then become nn.Linear / nn.Conv2d), or exclude them with filter_fn"
        )
    return todo


def _nothing_converted(model: nn.Module, filter_fn: FilterFn | None) -> str:
    """The "converted no layer" warning, naming what the model holds instead."""
    types = tuple(_BY_DENSE)
    modules = list(model.modules())
    subclasses = sorted(
        {type(m).__name__ for m in modules if isinstance(m, types) and _dense_handler(m) is None}
    )
    with_params = sorted(
        {type(m).__name__ for m in modules if any(True for _ in m.parameters(recurse=False))}
    )
    msg = (
        f"sparsify_ converted no layer: {type(model).__name__} has no exact "
        f"{', '.join(t.__name__ for t in types)} instance"
        f"{' that filter_fn accepts' if filter_fn is not None else ''}"
    )
    if subclasses:
        msg += f"; subclasses {subclasses} are left alone (their forward may differ)"
    msg += f"; its layers with parameters: {with_params or 'none'}"
    return msg + "; other layer types: meprop.convert.register_layer"


def number_depths(model: nn.Module) -> None:
    """Each meProp layer's depth for adaptive k (TinyProp's damping): its position counted from
    the last one registered (0) towards the first (named_modules order). ``sparsify_`` calls it
    on the model it converts; call it on the whole model after converting its layers one by one
    (each with its own config), which numbers each call's layers alone."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "k_record", None), KRecord)]
    for depth, layer in enumerate(reversed(layers)):
        layer.k_record.depth = depth


def densify_(model: nn.Module, filter_fn: FilterFn | None = None):
    """Turn every meProp layer of ``model`` (itself included) back into its dense type:
    ``SparseLinear`` -> ``nn.Linear``, ``SparseLSTM`` -> ``nn.LSTM`` (an error if meSimp left
    its directions at different widths, which nn.LSTM cannot represent), ``SparseConv2d`` ->
    ``nn.Conv2d``, ``SparseConv1D`` -> ``Conv1D``.

    Args:
        model: any module.
        filter_fn: as for ``sparsify_``.

    Returns:
        ``model``.
    """
    _check_filter(filter_fn)
    _handlers()
    for name, module in model.named_modules():
        handler = _sparse_handler(module)
        if handler is not None and (filter_fn is None or filter_fn(module, name)):
            handler.to_dense(module)
    return model


def converted(model: nn.Module) -> dict[str, str]:
    """The meProp layers of ``model``: ``{qualified_name: "SparseLinear(k=20, mode=...)"}``
    (the root's name is ``""``), in ``named_modules`` order.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> converted(sparsify_(mlp, MePropConfig(k=20), filter_fn=hidden_layers(mlp)))
        {'0': 'SparseLinear(from Linear, k=20, mode=per_example)'}
    """
    _handlers()
    out = {}
    for name, module in model.named_modules():
        handler = _sparse_handler(module)
        if handler is not None:
            c = module.config
            out[name] = (
                f"{handler.sparse.__name__}(from {handler.dense.__name__}, k={c.k}, mode={c.mode})"
            )
    return out


def hidden_layers(model: nn.Module) -> FilterFn:
    """A filter that accepts every ``nn.Linear`` of ``model`` except the last one registered.

    This is the paper's convention: meProp on the hidden layers, a dense output layer (whose
    width, e.g. 10 classes, is close to k anyway).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = linears[-1] if linears else None
    return lambda module, name: name != last
