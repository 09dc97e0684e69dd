"""A DDP communication hook that all-reduces only the rows of the weight gradients meProp kept.

meProp's backward writes R rows of a layer's weight gradient dW (n, in) and leaves the others
zero (k rows for unified selection, at most M*k for per-example); a ``SparseConv2d``'s dW
(C_out, C_in / groups, kh, kw) is read the same way, a row per output channel. DDP
all-reduces every parameter's gradient whole; this hook
(``torch.distributed.algorithms.ddp_comm_hooks`` style: ``hook(state, bucket) -> Future``)
sends each meProp weight's rows packed densely instead, so it runs on any backend with a
dense all-reduce (NCCL and gloo), with no sparse tensors:

* the rows of a weight are known without reading dW: backward adds what it kept to a row log
  on the weight (``RowLog``, ``meprop.ops.ROWS_ATTR``). Where no log can be trusted (the
  weight is shared with a module that is not a meProp layer; torch.compile; autocast) the
  rows are found in dW (its non-zero rows), which costs one pass over it;
* unified selection with ``scope="global"`` keeps the same rows on every rank: the hook
  all-reduces those R = k rows (R x in values instead of n x in), plus a checksum of the rows
  that proves the ranks agreed;
* otherwise (per-example, ``scope="local"``, random) each rank's rows differ: one all-reduce
  (max) of an n-byte mask per weight gives their union, and the union's rows travel; a weight
  whose union covers more than ``dense_fraction`` of its rows travels whole, and so does one
  smaller than ``min_union_bytes`` (no mask is exchanged for it). The defaults are measured
  (docs/distributed.md): with 2 gloo processes, one more collective costs more than sending
  a 500 x 784 gradient whole, and packing a 4096 x 4096 one pays below about 0.3 of its rows;
* every other parameter of the bucket (biases, dense layers) travels whole, in the same
  all-reduce as the packed rows: one collective per bucket, two where a mask is exchanged.

The result is DDP's average, up to the order of floating-point operations: the rows that do
not travel are zero on every rank. (The hook leaves them as they are: zero, or an average of
an earlier step when gradients accumulate without ``zero_grad``, the same on every rank.)
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .conv import SparseConv2d
from .nn import SparseLinear
from .ops import ROWS_ATTR, Selection

__all__ = ["RowLog", "CompactState", "compact_allreduce_hook", "compact_weights"]

# (No "from __future__ import annotations": DDP checks the hook's return annotation.)
# The agreement checksum of a weight's rows is an integer < _MOD, exact in float32 after the
# sum over up to 2**24 / _MOD = 2048 ranks.
_MOD = 8191


class RowLog:
    """The rows of one weight's gradient that meProp's backward wrote since the last ``take``.

    Backward calls ``add`` with its ``Selection``; the hook ``take``s the (n,) bool mask once
    per step. ``fresh`` is False where no backward wrote since: the hook then reads dW.
    """

    __slots__ = ("mask", "fresh")

    def __init__(self, n: int, device: torch.device) -> None:
        self.mask = torch.zeros(n, dtype=torch.bool, device=device)
        self.fresh = False

    def add(self, sel: Selection) -> None:
        if sel.kind == "all":
            self.mask.fill_(True)
        elif sel.kind == "mask":  # a conv's per_position keep (B, C_out, H', W'): no sync
            self.mask |= sel.keep.any(dim=(0, 2, 3))
        else:  # "cols": index (k,); "rows": index (M, k)
            self.mask.index_fill_(0, sel.index.reshape(-1), True)
        self.fresh = True

    def take(self) -> Tensor | None:
        """The mask of rows written since the last take (None if none was), and a new log."""
        if not self.fresh:
            return None
        mask, self.mask = self.mask, torch.zeros_like(self.mask)
        self.fresh = False
        return mask


@dataclass(frozen=True)
class _Weight:
    name: str
    shape: tuple[int, int]  # (n, in); a convolution's (C_out, C_in / groups * kh * kw)
    log: RowLog | None  # None: the rows are read from dW
    agreed: bool  # the ranks keep the same rows (unified, scope="global"; logged)
    big: bool  # at least min_union_bytes: worth a mask exchange


_LAYERS = (SparseLinear, SparseConv2d)  # the layers whose backward logs its rows (dW's dim 0)


def compact_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights whose gradients the hook packs: those of ``SparseLinear`` and
    ``SparseConv2d`` layers with k below their outputs (features, channels) and dense gradients
    (``sparse_grad=False``), by name."""
    out = {}
    for name, m in model.named_modules():
        if type(m) in _LAYERS and not m.config.sparse_grad and m.config.k < m.weight.shape[0]:
            if m.weight.requires_grad:
                out[f"{name}.weight" if name else "weight"] = m.weight
    return out


@dataclass
class CompactState:
    """The state of ``compact_allreduce_hook``: which weights to pack, and byte counts.

    Building it attaches a ``RowLog`` to each packed weight (call it once the model's
    Parameters are final: after ``sparsify_`` and any checkpoint load; again after meSimp
    replaced them, which ``MePropDDP.rewrap`` does).

    Args:
        model: the module DDP wraps (not the wrapper).
        process_group: the group DDP reduces over (default: all ranks).
        dense_fraction: a weight whose union of rows over the ranks is more than this share
            of its rows travels whole (packing would copy almost everything for little gain).
        min_union_bytes: a weight whose ranks keep different rows is packed only from this
            size on (in bytes; smaller ones travel whole, with no mask exchanged). Weights of
            unified layers with ``scope="global"`` are packed at any size.

    Attributes:
        bytes_sent: bytes this rank passed to collectives so far (values, masks, checksums).
        bytes_dense: bytes DDP's ordinary all-reduce would have passed for the same buckets.

    Example (on every rank)::

        ddp = DistributedDataParallel(model)
        state = CompactState(model)
        ddp.register_comm_hook(state, compact_allreduce_hook)
    """

    model: nn.Module
    process_group: object = None
    dense_fraction: float = 0.25
    min_union_bytes: int = 4 << 20
    bytes_sent: int = 0
    bytes_dense: int = 0
    weights: dict[int, _Weight] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ValueError(f"dense_fraction must be in [0, 1], got {self.dense_fraction}")
        if self.min_union_bytes < 0:
            raise ValueError(f"min_union_bytes must be >= 0, got {self.min_union_bytes}")
        # A weight also used by another kind of module gets gradient rows its log misses.
        users: dict[int, int] = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    users[id(p)] = users.get(id(p), 0) + (0 if type(m) in _LAYERS else 1)
        owner = {}
        for m in self.model.modules():
            if type(m) in _LAYERS:
                owner.setdefault(id(m.weight), m)
        for name, p in compact_weights(self.model).items():
            m = owner[id(p)]
            trusted = users.get(id(p), 0) == 0
            agreed = trusted and m.config.mode == "unified" and m.config.scope == "global"
            big = p.numel() * p.element_size() >= self.min_union_bytes
            log = RowLog(p.shape[0], p.device) if trusted and (agreed or big) else None
            setattr(p, ROWS_ATTR, log)
            if agreed or big:
                shape = (p.shape[0], p.numel() // p.shape[0])
                self.weights[id(p)] = _Weight(name, shape, log, agreed, big)

    def reset_counts(self) -> None:
        self.bytes_sent = self.bytes_dense = 0


def _count(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _checksum(rows: Tensor, dtype: torch.dtype) -> Tensor:
    r = rows.to(torch.int64)
    return ((r * (r + 7919)).sum() + 13 * r.numel()).remainder(_MOD).to(dtype).reshape(1)


def compact_allreduce_hook(state: CompactState, bucket) -> torch.futures.Future[Tensor]:
    """All-reduce a DDP bucket, each meProp weight as its kept rows packed densely; divide by
    the world size as DDP does. Register with ``ddp.register_comm_hook(state, this)``."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    params = bucket.parameters()
    state.bytes_dense += _count(buf)
    # Agreed rows need float32/64 for their checksum; else only big weights are packed.
    exact = buf.dtype in (torch.float32, torch.float64)
    packed = [state.weights.get(id(p)) for p in params]
    packed = [w if w is not None and ((w.agreed and exact) or w.big) else None for w in packed]
    sizes = [p.numel() for p in params]
    if buf.is_sparse or not any(packed) or sum(sizes) != buf.numel():
        state.bytes_sent += _count(buf)
        buf.div_(world)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    masks, agreed = _row_masks(state, buf, packed, offsets, sizes, exact, group)
    pieces, places, checks = _message(state, buf, packed, masks, agreed, offsets, sizes)
    values = sum(p.numel() for p in pieces)
    flat = torch.cat(pieces + checks)
    state.bytes_sent += _count(flat)
    fut = dist.all_reduce(flat, group=group, async_op=True).get_future()
    names = [w.name for w, ok in zip(packed, agreed, strict=True) if ok]
    unpack = functools.partial(_unpack, buf=buf, packed=packed, places=places, values=values,
                               checks=checks, world=world, names=names)  # fmt: skip
    return fut.then(unpack)


def _row_masks(state, buf, packed, offsets, sizes, exact, group):
    """Each packed weight's rows to send (a bool mask over its rows, None for the others),
    and whether they are agreed by construction (the same on every rank: no exchange, a
    checksum proves it). Rows recorded by the layer, or the non-zero rows of its dW; rows
    that are not agreed are united over the ranks (one max-reduce of all such masks)."""
    masks: list[Tensor | None] = []
    logged: list[bool] = []
    for w, off, s in zip(packed, offsets, sizes, strict=False):
        mask = w.log.take() if w is not None and w.log is not None else None
        logged.append(mask is not None)
        if w is not None and mask is None:
            mask = buf[off : off + s].view(w.shape).ne(0).any(1)
        masks.append(mask)
    # (Rows read from dW are not agreed: a row can be zero by chance on one rank.)
    agreed = [
        w is not None and w.agreed and exact and ok for w, ok in zip(packed, logged, strict=True)
    ]
    union = [i for i, w in enumerate(packed) if w is not None and not agreed[i]]
    if union:
        flat_mask = torch.cat([masks[i] for i in union]).to(torch.uint8)
        state.bytes_sent += _count(flat_mask)
        dist.all_reduce(flat_mask, op=dist.ReduceOp.MAX, group=group)
        for i, part in zip(
            union, flat_mask.split([packed[i].shape[0] for i in union]), strict=True
        ):
            masks[i] = part.bool()
    return masks, agreed


def _message(state, buf, packed, masks, agreed, offsets, sizes):
    """The flat message: whole runs of the buffer and packed rows (``pieces``), where each
    goes back (``places``: offset, numel, rows or None, weight index), and the checksums of
    the agreed rows."""
    pieces: list[Tensor] = []
    places: list[tuple[int, int, Tensor | None, int]] = []
    checks: list[Tensor] = []
    run_start = None
    for i, (w, off, s) in enumerate(zip(packed, offsets, sizes, strict=False)):
        rows = None
        if w is not None:
            rows = masks[i].nonzero().squeeze(1)
            if rows.numel() > state.dense_fraction * w.shape[0] and not agreed[i]:
                rows = None  # (all ranks decide alike: the union is the same everywhere)
        if rows is None:  # travels whole, with its neighbours
            run_start = off if run_start is None else run_start
            continue
        if run_start is not None:
            pieces.append(buf[run_start:off])
            places.append((run_start, off - run_start, None, -1))
            run_start = None
        pieces.append(buf[off : off + s].view(w.shape).index_select(0, rows).reshape(-1))
        places.append((off, s, rows, i))
        if agreed[i]:
            checks.append(_checksum(rows, buf.dtype))
    if run_start is not None:
        pieces.append(buf[run_start:])
        places.append((run_start, buf.numel() - run_start, None, -1))
    return pieces, places, checks


def _unpack(f, *, buf, packed, places, values, checks, world, names) -> Tensor:
    """The all-reduced message back into the bucket, divided by the world size; agreed rows'
    checksums checked first (``names``: their weights)."""
    out = f.value()[0]
    if checks:
        got = out[values:]
        want = torch.cat(checks) * world
        if not torch.equal(got, want):
            raise RuntimeError(
                f"the ranks kept different gradient rows of {names} although their layers "
                "select over all ranks (unified, scope='global'): the ranks' models or "
                "adaptive-k states differ; wrap the model with compact=False, or "
                "re-broadcast the model and optimizer state"
            )
    out = out[:values].div_(world)
    pos = 0
    for off, s, rows, i in places:
        if rows is None:
            buf[off : off + s].copy_(out[pos : pos + s])
            pos += s
        else:
            n_in = packed[i].shape[1]
            part = out[pos : pos + rows.numel() * n_in].view(-1, n_in)
            buf[off : off + s].view(packed[i].shape).index_copy_(0, rows, part)
            pos += part.numel()
    return buf
