"""Drop-in modules whose backward pass is meProp's (see ``meprop.ops``).

``SparseLinear`` is an ``nn.Linear``: same constructor arguments, parameters and state_dict
keys, so checkpoints load either way, and ``sparsify_`` can turn an existing ``nn.Linear`` into
one in place, keeping its Parameter objects (an optimizer built before the swap still works).
``SparseConv1D`` does the same for Hugging Face's GPT-2-style ``Conv1D`` (weight stored
(in, out)); it is built on first use, so ``transformers`` stays optional.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adaptive import KRecord
from .config import MePropConfig, check_row_config
from .ops import apply_config

__all__ = ["SparseLinear", "Cube", "swap_class", "base_class"]  # and SparseConv1D (on access)


def base_class(module: nn.Module) -> type:
    """The layer type of ``module``: its class, or, for a module that
    ``torch.nn.utils.parametrize`` has wrapped (``ParametrizedLinear``, a subclass it makes per
    module to hold the parametrized properties), the class it wrapped."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def swap_class(module: nn.Module, cls: type) -> None:
    """Make ``module`` an instance of ``cls`` in place. A parametrized module stays
    parametrized: its new class is a ``Parametrized<cls>`` holding the same properties (the
    parametrizations' forward and backward run as before; ``remove_parametrizations`` then
    leaves a ``cls``)."""
    if parametrize.is_parametrized(module):
        own = {
            k: v
            for k, v in vars(type(module)).items()
            if k not in ("__module__", "__dict__", "__weakref__", "__doc__", "__qualname__")
        }
        cls = type(f"Parametrized{cls.__name__}", (cls,), own)
    module.__class__ = cls


class SparseLinear(nn.Linear):
    """``nn.Linear`` whose backward keeps only the top-k entries of the output gradient.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: a ``MePropConfig``: k, selection mode, bias and gradient options. Layers with
            ``out_features <= k`` compute the exact dense gradient.

    Attributes:
        usage: ``None``, or a pair of tensors ``(counts (out_features,), selections (1,))`` that
            backward increments (how often each unit was selected; how many selections). meSimp
            attaches it; see ``meprop.simplify``.
        k_record: a ``meprop.adaptive.KRecord``: adaptive k's memory and the layer's depth.
        last_k: the mean k of the latest backward (None before the first).

    Example:
        >>> layer = SparseLinear(500, 500, config=MePropConfig(k=20))
        >>> layer
        SparseLinear(in_features=500, out_features=500, bias=True, k=20, mode=per_example)
    """

    config: MePropConfig
    usage: tuple[Tensor, Tensor] | None
    k_record: KRecord

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: MePropConfig | None = None,
    ) -> None:
        if not isinstance(config, MePropConfig):
            raise TypeError(
                f"SparseLinear needs config=MePropConfig(k=...), got {type(config).__name__}"
            )
        check_row_config(config, "SparseLinear")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config = config
        self.usage = None
        self.k_record = KRecord()

    @property
    def last_k(self) -> float | None:
        return self.k_record.last_k

    def forward(self, input: Tensor) -> Tensor:
        usage = (None, None) if self.usage is None else self.usage
        return apply_config(input, self.weight, self.bias, self.config, *usage, self.k_record)

    def extra_repr(self) -> str:
        return super().extra_repr() + config_repr(self.config)


def config_repr(c: MePropConfig) -> str:
    """The config's part of a meProp module's repr: ", k=20, mode=per_example", ..."""
    s = f", k={c.k}, mode={c.mode}"
    if c.sparse_bias:
        s += ", sparse_bias=True"
    if c.sparse_grad:
        s += ", sparse_grad=True"
    if c.scope != "local":
        s += f", scope={c.scope}"
    if c.adapt is not None:
        s += f", adapt={c.adapt.rule}, min_k={c.adapt.min_k}"
    if c.memory:
        s += f", memory={c.memory:g}"
    if c.warmup:
        s += f", warmup={c.warmup}"
    return s


@functools.cache
def sparse_conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D

    class SparseConv1D(Conv1D):
        """Hugging Face ``Conv1D`` (GPT-2's MLP and attention projections: ``x W + b`` with
        ``weight`` (in, out)) whose backward keeps only the top-k output-gradient entries.

        The weight keeps its (in, out) layout (a transposed view goes to ``meprop.ops``), so
        the Parameters and state_dict are the original's. ``sparse_grad`` is not supported:
        a row-sparse gradient of W^T is column-sparse in this layout.
        """

        config: MePropConfig
        usage: tuple[Tensor, Tensor] | None
        k_record: KRecord

        @property
        def last_k(self) -> float | None:
            return self.k_record.last_k

        def forward(self, x: Tensor) -> Tensor:
            usage = (None, None) if self.usage is None else self.usage
            return apply_config(x, self.weight.t(), self.bias, self.config, *usage, self.k_record)

        def __repr__(self) -> str:
            return f"SparseConv1D(nf={self.nf}, nx={self.nx}{config_repr(self.config)})"

    # pickled by name: meprop.nn.SparseConv1D (the module __getattr__ below)
    SparseConv1D.__module__, SparseConv1D.__qualname__ = __name__, "SparseConv1D"
    return SparseConv1D


def __getattr__(name: str):
    # meprop.nn.SparseConv1D imports transformers on first access only.
    if name == "SparseConv1D":
        return sparse_conv1d_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Cube(nn.Module):
    """x ** 3, elementwise: the hidden activation of Chen & Manning's (2014) parser."""

    def forward(self, input: Tensor) -> Tensor:
        return input * input * input
