"""The collectives below the model code: rank, world size and sums over the ranks.

``meprop.ops`` needs one collective inside backward (``sum_over_ranks``, for unified selection
with ``scope="global"``); keeping these few functions apart from ``meprop.distributed`` (DDP
wrapping, sharding, the distributed meSimp) lets the lowest layer use them without importing
the modules above it. Every function is a no-op, or the identity, in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "several_ranks",
    "rank",
    "world_size",
    "set_selection_group",
    "sum_over_ranks",
    "mean_over_ranks",
    "seed_rank",
    "barrier",
]

# The process group of scope="global" selection; None: the default group.
_SELECTION_GROUP = None


def several_ranks(group=None) -> bool:
    """Whether torch.distributed runs with more than one rank (in ``group``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def set_selection_group(group) -> None:
    """The process group whose ranks ``scope="global"`` selection sums over (default: all).

    Set it, on every rank, when the model is trained by a subgroup (``DDP(process_group=...)``).
    """
    global _SELECTION_GROUP
    _SELECTION_GROUP = group


def sum_over_ranks(scores: Tensor) -> Tensor:
    """Unified selection's (n,) column scores summed over the ranks (unchanged in one process).

    Runs inside backward, so every rank of the group must run the same backward: the same
    layers, in the same order. The sum is one all-reduce of n numbers per layer and step.
    """
    if not several_ranks(_SELECTION_GROUP):
        return scores
    scores = scores.contiguous()  # all_reduce works in place
    dist.all_reduce(scores, group=_SELECTION_GROUP)
    return scores


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean over the ranks of a tensor (a collective; unchanged in one process)."""
    if not several_ranks():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def seed_rank(seed: int, epoch: int) -> None:
    """In a multi-process run, seed this rank's RNG for an epoch: dropout masks and random-k
    picks differ between ranks, and a resumed run draws the same ones. One process: no-op."""
    if several_ranks():
        torch.manual_seed((seed * 1_000_003 + epoch) * 65_537 + rank())


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if several_ranks():
        dist.barrier()
