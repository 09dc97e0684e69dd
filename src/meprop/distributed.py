"""meProp and meSimp under torch.distributed: DistributedDataParallel (DDP), one process per rank.

DDP runs forward and backward on every rank with its own part of the global batch and averages
the ranks' gradients. meProp's per-example and random selections depend on one example only, so
they need nothing more: the averaged gradient is one process's gradient on the global batch as
long as each rank's loss carries its share of the global batch (``shard``), up to the order
of floating-point sums. That order is not nothing: per-example top-k training without dropout
is chaotic (the README's instability), and a difference in the last bit flips a near-tie of
the selection within some tens of steps, after which the runs go apart. One process alone does
the same when only the order of the rows in each batch changes (MNIST 784-500-500-10, k=20,
Adam, batches of 50: the largest parameter difference from the original order is 1e-8 after
one step, 5e-7 after 50, 1e-2 after 100 and 0.5 after 1000, for reversed rows and for two
halves summed as DDP does, alike). So two processes equal one exactly in the gradients' math,
and their runs are as close as two orders of summation in one process. What this module adds,
each a piece that hooks into an ordinary DDP loop:

* ``sum_over_ranks``: unified selection with ``MePropConfig(scope="global")`` sums its (n,)
  column scores over the ranks inside backward, so every rank keeps the global batch's columns.
* ``wrap`` (``MePropDDP``): DDP that all-reduces meProp's row-sparse weight gradients
  (``sparse_grad=True``) as sparse tensors, which gloo supports and NCCL does not (an error
  says so), and that refuses to run on parameters meSimp has replaced (``rewrap`` after it).
* ``compact_allreduce_hook`` (``meprop.ddp_hook``), which ``wrap`` registers: a DDP
  communication hook that all-reduces each meProp weight gradient as its kept rows packed
  densely (any backend: NCCL and gloo), the other parameters as usual.
* ``DistributedSimplifier``: sums the usage record over the ranks before each pruning decision,
  so that every rank removes the same units.
* ``shard``: a rank's part of a global batch and the weight of its loss.
* ``save``: a checkpoint of the whole job, written by rank 0 only (atomically).

One loop, on every rank (``meprop.experiments.launch`` starts the processes)::

    ddp = wrap(model)
    simp = DistributedSimplifier(model, MeSimpConfig(interval=600), optimizer)
    for batch in global_batches:                      # the same global batches on every rank
        (x, y), scale = shard(batch)
        (loss_fn(ddp(x), y) * scale).backward(); optimizer.step(); optimizer.zero_grad()
        if simp.step():                               # every rank pruned the same units
            ddp = ddp.rewrap()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint
from .comm import (  # noqa: F401  (re-exported: part of this module's API)
    barrier,
    mean_over_ranks,
    rank,
    seed_rank,
    set_selection_group,
    sum_over_ranks,
    world_size,
)
from .comm import several_ranks as _active
from .config import MeSimpConfig
from .ddp_hook import CompactState, compact_allreduce_hook, compact_weights
from .lstm import SparseLSTM, param_names
from .nn import SparseLinear
from .simplify import Pair, Simplifier

__all__ = [
    "rank",
    "world_size",
    "sum_over_ranks",
    "set_selection_group",
    "sparse_grad_parameters",
    "MePropDDP",
    "wrap",
    "CompactState",
    "compact_allreduce_hook",
    "DistributedSimplifier",
    "shard",
    "mean_over_ranks",
    "save",
    "seed_rank",
    "barrier",
]

_rank, _world_size = rank, world_size  # (shard's arguments shadow the names)


# --------------------------------------------------------------------------------------------
# DDP


def sparse_grad_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The Parameters to which meProp gives row-sparse gradients (``sparse_grad=True``): the
    weights of such ``SparseLinear`` layers and the gate weights of such ``SparseLSTM``s."""
    out = []
    for m in module.modules():
        if isinstance(m, SparseLinear) and m.config.sparse_grad:
            out.append(m.weight)
        elif isinstance(m, SparseLSTM) and m.config.sparse_grad:
            for layer, d in m.sizes():
                w_ih, w_hh, _, _ = param_names(layer, d)
                out += [getattr(m, w_ih), getattr(m, w_hh)]
    return [p for p in out if p.requires_grad]


def _signature(module: nn.Module) -> list[tuple[nn.Parameter, torch.Size]]:
    return [(p, p.shape) for p in module.parameters()]


class MePropDDP(DistributedDataParallel):
    """``DistributedDataParallel`` for models with meProp layers.

    Three differences from DDP: the weights that meProp gives row-sparse gradients
    (``sparse_grad=True``) are reduced as sparse tensors, in buckets of their own, as DDP does
    for ``nn.Embedding(sparse=True)``; the dense gradients of the other meProp weights are
    all-reduced as their kept rows packed densely (``compact``: the communication hook of
    ``meprop.ddp_hook``, any backend); and forward raises if the module's parameters are no
    longer those it was built with (meSimp shrank the model, or a checkpoint resized it),
    instead of silently averaging gradients of tensors that no longer train: call ``rewrap()``.

    Sparse gradients need a backend with a sparse all-reduce: gloo has one; NCCL raises "NCCL
    does not support all_reduce with sparse tensors", so construction refuses that case.

    Args:
        module, *args, **kwargs: as ``DistributedDataParallel``.
        compact: where the module has meProp weights with dense gradients, default
            ``gradient_as_bucket_view`` to True and, where ``CompactState`` finds weights
            worth packing, register ``compact_allreduce_hook`` (its state is then
            ``self.compact_state``, which counts the bytes sent; else None);
            a dict: the same, with these ``CompactState`` options (``dense_fraction``,
            ``min_union_bytes``); False: DDP's ordinary all-reduce and options.

    Example (on every rank, after ``torch.distributed.init_process_group``)::

        ddp = MePropDDP(model)
        loss_fn(ddp(x), y).backward()
    """

    def __init__(
        self, module: nn.Module, *args: Any, compact: bool | dict = True, **kwargs: Any
    ) -> None:
        sparse = sparse_grad_parameters(module)
        if sparse:
            group = kwargs.get("process_group")
            backend = dist.get_backend(group)
            if backend != "gloo":
                raise ValueError(
                    f"sparse_grad=True under DDP needs the gloo backend (a sparse all-reduce), "
                    f"got {backend!r}: use MePropConfig(sparse_grad=False) with {backend!r}, "
                    "or a gloo process group"
                )
        self._meprop_sparse = {id(p) for p in sparse}  # read by _build_params_for_reducer
        # The compacted all-reduce: where meProp weights have dense gradients (sparse ones
        # already travel as sparse tensors) and some are worth packing (CompactState's
        # rules; a Python hook that packs nothing is slower than DDP's own all-reduce). The
        # gradients are then views of DDP's buckets by default: a meProp dW is mostly
        # untouched zero pages, which DDP would otherwise copy whole into its bucket and back.
        state = None
        if compact and not sparse and compact_weights(module):
            options = compact if isinstance(compact, dict) else {}
            state = CompactState(module, kwargs.get("process_group"), **options)
            kwargs.setdefault("gradient_as_bucket_view", True)
        super().__init__(module, *args, **kwargs)
        self._meprop_args = (args, dict(kwargs, compact=compact))
        self._meprop_signature = _signature(module)
        self.compact_state: CompactState | None = None
        if state is not None and state.weights:
            self.compact_state = state
            self.register_comm_hook(state, compact_allreduce_hook)

    def _build_params_for_reducer(self):
        # DDP flags only nn.Embedding/EmbeddingBag(sparse=True) as producing sparse gradients;
        # a sparse gradient in a dense bucket fails ("Cannot access storage of
        # SparseTensorImpl"). Flag meProp's too.
        parameters, expect_sparse = super()._build_params_for_reducer()
        flags = [
            e or id(p) in self._meprop_sparse
            for p, e in zip(parameters, expect_sparse, strict=True)
        ]
        return parameters, flags

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        now = _signature(self.module)
        same = len(now) == len(self._meprop_signature) and all(
            p is q and s == t for (p, s), (q, t) in zip(now, self._meprop_signature, strict=True)
        )
        if not same:
            raise RuntimeError(
                "the module's parameters changed since DDP wrapped it (meSimp shrank it, or a "
                "checkpoint resized it): its gradients would no longer be averaged; call "
                "ddp = ddp.rewrap() on every rank after Simplifier.step() returns True"
            )
        return super().forward(*inputs, **kwargs)

    def rewrap(self) -> MePropDDP:
        """A new wrapper of the same module and options (a collective: call on every rank).

        This wrapper's gradient hooks are removed first: those left on Parameters that meSimp
        kept (a consumer's bias) would otherwise feed a reducer that no longer runs.
        """
        self._remove_autograd_hooks()
        args, kwargs = self._meprop_args
        return type(self)(self.module, *args, **kwargs)


def wrap(model: nn.Module, *, compact: bool | dict = True, **ddp_kwargs: Any) -> MePropDDP:
    """``MePropDDP(model, **ddp_kwargs)``: DDP that knows meProp's sparse gradients and, with
    ``compact`` (default), all-reduces only the rows meProp kept.

    Call on every rank after ``init_process_group`` and after any checkpoint is loaded (loading
    resizes the parameters of a shrunk model); it broadcasts rank 0's parameters. Use it, not
    torch's ``DistributedDataParallel``, for layers with ``sparse_grad=True``: under a plain DDP
    their forward raises (DDP's reducer cannot take row-sparse gradients).

    Args:
        model: the module (with ``SparseLinear``/``SparseLSTM`` layers or not).
        compact: the compacted all-reduce of meProp's weight gradients (``MePropDDP``).
        **ddp_kwargs: ``DistributedDataParallel``'s options (``process_group``, ...).

    Example (on every rank)::

        ddp = wrap(model)
        (loss_fn(ddp(x), y) * share).backward()
    """
    if isinstance(model, DistributedDataParallel):
        raise TypeError("model is already wrapped in DDP: pass the module itself")
    return MePropDDP(model, compact=compact, **ddp_kwargs)


# --------------------------------------------------------------------------------------------
# meSimp


class DistributedSimplifier(Simplifier):
    """A ``Simplifier`` for DDP: every rank prunes the same units at the same step.

    Each rank's layers count the top-k selections of its own examples. Before each pruning
    decision the counts are summed over the ranks (one all-reduce), so every rank holds the
    record of the global batch and decides identically; since the ranks' parameters and
    optimizer states are identical too (DDP), they stay identical after the shrink. Rebuild the
    DDP wrapper after each shrink (``ddp = ddp.rewrap()``, on every rank).

    ``step()`` must be called on every rank after every optimizer step. With
    ``MeSimpConfig(unit="examples")`` pass this rank's examples (they are summed over ranks).
    ``save`` checkpoints the whole record (see ``consolidate``); ``load_state_dict`` restores
    it on any number of ranks.

    Args:
        model, config, optimizer, pairs: as ``Simplifier``; ``model`` is the module, not its
            DDP wrapper.
        group: the process group of the ranks (default: all).

    Example (on every rank)::

        simp = DistributedSimplifier(model, MeSimpConfig(interval=600), optimizer)
        ddp = wrap(model)
        ...  # forward through ddp, backward, optimizer.step()
        if simp.step():
            ddp = ddp.rewrap()
    """

    agrees_over_ranks = True

    def __init__(
        self,
        model: nn.Module,
        config: MeSimpConfig,
        optimizer: torch.optim.Optimizer | None = None,
        pairs: Sequence[Pair] | None = None,
        *,
        group=None,
    ) -> None:
        if isinstance(model, DistributedDataParallel):
            raise TypeError(
                "pass the module, not its DDP wrapper: DistributedSimplifier(ddp.module, ...)"
            )
        super().__init__(model, config, optimizer, pairs)
        self.group = group

    def _usage_tensors(self) -> list[Tensor]:
        """Every live counter, in the same order on every rank (pairs, then groups)."""
        out = []
        for pair in self.pairs:
            for _, (counts, selections) in sorted(self._usage(pair.producer).items()):
                out += [counts, selections]
        return out

    def _all_reduce_usage(self) -> None:
        """Sum every counter over the ranks, in place: one all-reduce of all of them."""
        if not self._recording or not _active(self.group):
            return
        tensors = self._usage_tensors()
        flat = torch.cat([t.reshape(-1) for t in tensors])  # int64: exact sums
        dist.all_reduce(flat, group=self.group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    def step(self, examples: int | None = None) -> bool:
        if examples is not None and self.config.unit == "examples" and _active(self.group):
            total = torch.tensor([examples], dtype=torch.int64)
            dist.all_reduce(total, group=self.group)
            examples = int(total)
        return super().step(examples)

    def prune(self) -> bool:
        self._all_reduce_usage()
        return super().prune()

    def consolidate(self) -> None:
        """Move the whole usage record to rank 0 (the others' counters become zero), so that
        rank 0's ``state_dict()`` holds the global record; the sums the next pruning takes are
        unchanged. A collective: call on every rank before rank 0 writes a checkpoint."""
        self._all_reduce_usage()
        if self._recording and _active(self.group) and dist.get_rank(self.group) != 0:
            for t in self._usage_tensors():
                t.zero_()

    def load_state_dict(self, state: dict) -> None:
        """Restore a (consolidated) state: rank 0 takes the saved record, the others start at
        zero, so the sum over ranks is the saved record, whatever the number of ranks."""
        super().load_state_dict(state)
        if self._recording and _active(self.group) and dist.get_rank(self.group) != 0:
            for t in self._usage_tensors():
                t.zero_()


# --------------------------------------------------------------------------------------------
# Data and checkpoints


def _split_rows(batch, parts: int) -> list:
    """``parts`` consecutive slices of a tuple of tensors along their first dimension."""
    items = batch if isinstance(batch, tuple | list) else (batch,)
    sizes = {t.shape[0] if isinstance(t, Tensor) and t.dim() else None for t in items}
    if len(sizes) != 1 or None in sizes:
        raise TypeError(
            "cannot split this batch between ranks: it is not a tensor or a tuple of tensors "
            "sharing their first dimension; give the task (or shard) a split_batch(batch, "
            "parts) and a loss_terms(batch)"
        )
    pieces = [t.tensor_split(parts) for t in items]
    out = [tuple(p[i] for p in pieces) for i in range(parts)]
    return out if isinstance(batch, tuple | list) else [o[0] for o in out]


def _rows(batch) -> int:
    return (batch[0] if isinstance(batch, tuple | list) else batch).shape[0]


def shard(
    batch,
    task=None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[Any, float]:
    """This rank's part of a global batch, and the factor to multiply its mean loss by.

    The global batch is cut into ``world_size`` consecutive parts (sizes differ by at most one
    example). A rank's loss, a mean over its part's ``loss_terms``, times
    ``terms(part) * world_size / terms(global batch)`` makes DDP's average over the ranks the
    mean over the global batch: the gradients of one process on the same global batch. With
    equal parts the factor is 1.

    A part with nothing to average (a last batch with fewer examples than ranks) is replaced
    by another rank's part with factor 0: it contributes zero gradient, and DDP still gets its
    backward. (A meSimp usage record then counts that part's selections twice.)

    Args:
        batch: one global batch, the same on every rank.
        task: optional object with ``split_batch(batch, parts) -> list`` and
            ``loss_terms(batch) -> int`` (the number of terms the task's loss averages over);
            by default a batch is a tuple of tensors split along their first dimension and its
            terms are its rows.
        rank, world_size: default: those of the default process group.

    Returns:
        ``(part, factor)``; in one process ``(batch, 1.0)``.
    """
    r = _rank() if rank is None else rank
    w = _world_size() if world_size is None else world_size
    if w == 1:
        return batch, 1.0
    split: Callable = getattr(task, "split_batch", None) or _split_rows
    terms: Callable = getattr(task, "loss_terms", None) or _rows
    parts = split(batch, w)
    weights = [terms(p) for p in parts]
    total = sum(weights)
    if weights[r] == 0:
        filled = next((p for p, n in zip(parts, weights, strict=True) if n > 0), None)
        if filled is None:
            raise ValueError("a global batch with nothing to average over: no loss terms at all")
        return filled, 0.0
    return parts[r], weights[r] * w / total


# ``meprop.save`` does what a DDP job needs (every rank calls it; rank 0 writes): the same
# function under this name too.
save = checkpoint.save
