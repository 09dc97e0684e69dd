"""Argument checks and error messages shared by the CPU kernels (C++ ``native``, numba ``cpu``
and meAct's ``active``), so the implementations agree on what they accept and how they fail.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DTYPES", "BIG_BYTES", "supports", "check_float", "check_pairs", "check_n", "raise_bad"]

DTYPES = (torch.float32, torch.float64)

# Outputs from this many bytes on are allocated by numpy (not by torch, not inside numba): it
# asks the kernel for huge pages (4 MiB and up), which makes first-touch page faults many
# times cheaper (a fresh 64 MiB float32 dW: ~3-8 ms instead of ~30 ms on the development
# machine), and np.zeros (calloc) leaves the untouched pages unwritten.
BIG_BYTES = 4 << 20


def supports(t: Tensor) -> bool:
    """Whether the kernels accept tensors like ``t``: dense float32/float64 on the CPU."""
    return t.device.type == "cpu" and t.dtype in DTYPES and t.layout == torch.strided


def check_float(name: str, t: Tensor) -> Tensor:
    """``t`` contiguous, or TypeError where it is not a float32/float64 CPU tensor."""
    if not supports(t):
        raise TypeError(f"{name} must be a float32/float64 CPU tensor, got {t.dtype} on {t.device}")
    return t.contiguous()


def check_pairs(idx: Tensor, vals: Tensor, other: Tensor, other_name: str, rows: int):
    """Checked contiguous idx, vals (M, k) and the dense operand (``rows`` rows, or any where
    ``rows`` < 0; 2-D, the dtype of vals)."""
    if idx.dim() != 2 or idx.shape != vals.shape:
        raise ValueError(
            f"idx and vals must both be (M, k), got {tuple(idx.shape)} and {tuple(vals.shape)}"
        )
    if idx.dtype != torch.int64 or idx.device.type != "cpu":
        raise TypeError(f"idx must be an int64 CPU tensor, got {idx.dtype} on {idx.device}")
    v = check_float("vals", vals)
    o = check_float(other_name, other)
    if o.dim() != 2 or o.dtype != v.dtype:
        raise ValueError(
            f"{other_name} must be 2-D with the dtype of vals ({vals.dtype}), got "
            f"{tuple(other.shape)} {other.dtype}"
        )
    if rows >= 0 and o.shape[0] != rows:
        raise ValueError(f"{other_name} must have M={rows} rows, got {tuple(other.shape)}")
    return idx.contiguous(), v, o


def check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def raise_bad(bad: int, bound: int, name: str = "idx") -> None:
    """IndexError where a kernel counted ``bad`` > 0 values of ``name`` outside [0, bound)."""
    if bad > 0:
        raise IndexError(f"{bad} value(s) of {name} outside [0, {bound})")
