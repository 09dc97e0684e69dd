"""Reused gradient buffers for the C++ kernels: a caching allocator for dense dW outputs.

A fresh large (n, in) gradient costs page faults on every page written; this module keeps the
buffers it handed out and gives one back once nothing else holds it (read off the storage's
use count, a private torch API: ``torch._C._storage_Use_Count``; without it the pool is off).
``meprop.kernels.native`` takes its outputs from here (``dense_dw``, ``output``).
``MEPROP_GRAD_POOL=0`` turns the pool off; ``clear_grad_pool()`` releases the buffers.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
from torch import Tensor

from . import build, checks

__all__ = ["GradPool", "POOL", "clear_grad_pool", "dense_dw", "output", "numpy_block"]

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}


def numpy_block(rows: int, cols: int, dtype: torch.dtype, zero: bool) -> Tensor:
    """A (rows, cols) tensor on numpy memory (huge pages; calloc'ed when ``zero``) whose start,
    like every row of 64-byte multiple width, is 64-byte aligned, as streaming stores need."""
    nbytes = rows * cols * _ITEMSIZE[dtype]
    raw = (np.zeros if zero else np.empty)(nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return torch.from_numpy(raw[off : off + nbytes].view(_NUMPY[dtype]).reshape(rows, cols))


class GradPool:
    """dW buffers (dense, or the values of a row-sparse dW), reused once every tensor that
    shared them is gone.

    A fresh large (n, in) gradient costs page faults on every page written, and zeroing the
    pages of the rows written (~3-8 ms for a 64 MiB float32 dW here, most of meProp's
    dense-gradient backward at that size); a small one that few rows of reach costs writing
    all its zero rows (~14 us for 480 of 500 rows of 500 floats). Like a caching allocator,
    the pool keeps the buffers it handed out; once nothing else uses one (the optimizer step
    is done and ``.grad`` was set to None, or the gradient was added into an existing
    ``.grad``), the next backward of that shape takes it back and zeroes only the rows written
    last time, or all of it if an in-place operation changed it since (the tensor's version
    counter); a row-compact buffer is written in full, so it is taken back as it is. In-place
    writes that bypass the version counter (through ``.data`` or numpy) are not seen: set
    ``MEPROP_GRAD_POOL=0`` if your code does that. ``clear()`` drops the buffers. Every layer of a shape holds its
    gradient from its backward to the next ``zero_grad``, so the pool keeps up to
    ``PER_SHAPE`` buffers per shape (a model with more layers of one large shape gets fresh
    buffers for the rest) and ``MAX_BUFFERS`` in all (the shapes unused longest are dropped
    first, as meSimp shrinks layers). The memory kept is that of the gradients of the last
    step, as a caching allocator keeps it.
    """

    PER_SHAPE = 8  # buffers kept per (n, in, dtype)
    MAX_BUFFERS = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [[flat view, rows written, version after the write, users when free,
        #          storage], ...],
        # in order of last use (the dict's order: a key is moved to the end when used).
        self._bufs: dict[tuple, list[list]] = {}
        self.enabled = os.environ.get("MEPROP_GRAD_POOL", "1") != "0" and hasattr(
            torch._C, "_storage_Use_Count"
        )

    def take(
        self, n: int, d: int, dtype: torch.dtype, zero: bool = True, defer: bool = False
    ) -> tuple[Tensor, list | None, Tensor | None]:
        """An (n, d) tensor, its pool entry (None when not pooled) and, with ``defer``, the
        rows still to zero (the kernel zeroes them in the same call; else None).

        zero: a zero tensor (but for those rows); False: any contents (for outputs written in
        full, such as a row-compact dW).
        """
        key = (n, d, dtype, zero)
        with self._lock:
            entries = self._bufs.pop(key, []) if self.enabled else []
            if self.enabled:
                self._bufs[key] = entries  # most recently used last
            for e in entries:
                view, rows, version, alone, storage = e
                if torch._C._storage_Use_Count(storage._cdata) > alone:  # still in use
                    continue
                out = view.view(n, d)
                stale = None
                if not zero:
                    pass
                elif view._version != version or rows is None:
                    out.zero_()
                elif defer:
                    stale = rows
                elif rows.numel():
                    big = n * d * _ITEMSIZE[dtype] >= checks.BIG_BYTES  # (small: stay in cache)
                    build.kernel("zero_rows", dtype)(
                        out.data_ptr(), d, rows.data_ptr(), rows.numel(), big, 1
                    )
                e[1] = None  # until written() says which rows the kernel wrote
                return out, e, stale
            out = numpy_block(n, d, dtype, zero=zero)
            if len(entries) >= self.PER_SHAPE:
                return out, None, None
            view = out.view(-1)
            del out
            storage = view.untyped_storage()
            # (the count of users when only the pool holds it: its view and storage object)
            e = [view, None, 0, torch._C._storage_Use_Count(storage._cdata), storage]
            entries.append(e)
            self._trim()
            return view.view(n, d), e, None

    def _trim(self) -> None:
        """Drop buffers of the shapes unused longest while more than MAX_BUFFERS are kept."""
        extra = sum(map(len, self._bufs.values())) - self.MAX_BUFFERS
        for key in list(self._bufs)[:-1]:  # never the shape just used
            if extra <= 0:
                break
            dropped = self._bufs.pop(key)
            extra -= len(dropped)

    @staticmethod
    def written(entry: list | None, rows: Tensor) -> None:
        """Record the rows the kernel wrote into the buffer (after the write)."""
        if entry is not None:
            entry[1] = rows
            entry[2] = entry[0]._version

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


POOL = GradPool()


def clear_grad_pool() -> None:
    """Release the dense gradient buffers kept for reuse (see ``GradPool``)."""
    POOL.clear()


def dense_dw(n: int, d: int, dtype: torch.dtype, touched: int, defer: bool = False):
    """A dense (n, d) output for dW, its pool entry, the rows still to zero (``defer``: by the
    kernel; see GradPool.take) and the kernels' mode. Mode 2 writes the touched rows of a zero
    buffer from the pool (or fresh from calloc, whose untouched pages are never written): for
    large outputs, and where at most a quarter of the rows are ``touched`` (about; zeroing last
    call's rows and writing this call's beats writing all). Mode 1 writes every row of a new
    tensor (small outputs, most rows touched, in cache)."""
    if n * d * _ITEMSIZE[dtype] >= checks.BIG_BYTES or (POOL.enabled and 4 * touched <= n):
        return (*POOL.take(n, d, dtype, defer=defer), 2)
    return torch.empty(n, d, dtype=dtype), None, None, 1


def output(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """An output (rows, cols) that the kernels write in full: from the pool when large."""
    if rows * cols * _ITEMSIZE[dtype] >= checks.BIG_BYTES:
        return POOL.take(rows, cols, dtype, zero=False)[0]
    return torch.empty(rows, cols, dtype=dtype)
