"""Drop-in modules whose backward pass is meProp's (see ``meprop.ops``).

``SparseLinear`` is an ``nn.Linear``: same constructor arguments, parameters and state_dict
keys, so checkpoints load either way, and ``sparsify_`` can turn an existing ``nn.Linear`` into
one in place, keeping its Parameter objects (an optimizer built before the swap still works).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MePropConfig
from .ops import apply_config

__all__ = ["SparseLinear", "Cube"]


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

    Example:
        >>> layer = SparseLinear(500, 500, config=MePropConfig(k=20))
        >>> layer
        SparseLinear(in_features=500, out_features=500, bias=True, k=20, mode=per_example)
    """

    config: MePropConfig
    usage: tuple[Tensor, Tensor] | None

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
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config = config
        self.usage = None

    def forward(self, input: Tensor) -> Tensor:
        if self.usage is None:
            return apply_config(input, self.weight, self.bias, self.config)
        return apply_config(input, self.weight, self.bias, self.config, *self.usage)

    def extra_repr(self) -> str:
        c = self.config
        s = f"{super().extra_repr()}, k={c.k}, mode={c.mode}"
        if c.sparse_bias:
            s += ", sparse_bias=True"
        if c.sparse_grad:
            s += ", sparse_grad=True"
        if c.scope != "local":
            s += f", scope={c.scope}"
        return s


class Cube(nn.Module):
    """x ** 3, elementwise: the hidden activation of Chen & Manning's (2014) parser."""

    def forward(self, input: Tensor) -> Tensor:
        return input * input * input
