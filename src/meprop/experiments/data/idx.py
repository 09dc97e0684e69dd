"""A reader for IDX files (the MNIST format), gzipped or raw.

Layout, all big-endian: two zero bytes, a type code, the number of dimensions, one int32 per
dimension, then the data in C order. Gzip is detected by its magic bytes, not by the file
name, so a decompressed file keeps working under its ``.gz`` name and vice versa.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from .paths import DataError

__all__ = ["IDX_TYPES", "IdxError", "read_idx"]

#: IDX type code -> big-endian NumPy dtype.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(DataError, ValueError):
    """The file is not a well-formed IDX file."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a new, writable, native-endian array.

    Raises :class:`IdxError` naming the file for a bad magic number, an unknown type code, a
    truncated header or data, trailing bytes, or a corrupt gzip stream.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxError(
                f"{path}: corrupt gzip stream ({e}). Fix: delete the file and download it again."
            ) from e

    if len(raw) < 4:
        raise IdxError(f"{path}: not an IDX file (only {len(raw)} bytes, a header needs 4)")
    magic = int.from_bytes(raw[:4], "big")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise IdxError(
            f"{path}: not an IDX file (magic 0x{magic:08X}; an IDX file starts with 0x0000)"
        )
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X} {t.name}" for c, t in IDX_TYPES.items())
        raise IdxError(
            f"{path}: not an IDX file (magic 0x{magic:08X}): unknown type code 0x{code:02X}; "
            f"known codes: {known}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(
            f"{path}: truncated header: {ndim} dimensions need {header} header bytes, "
            f"found {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in shape):
        raise IdxError(f"{path}: negative dimension in shape {shape}")

    dtype = IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise IdxError(
            f"{path}: truncated: expected {expected} bytes of data for shape {shape} "
            f"({dtype.name}), found {found}. Fix: delete the file and download it again."
        )
    if found > expected:
        raise IdxError(
            f"{path}: expected {expected} bytes of data for shape {shape} ({dtype.name}), "
            f"found {found}: {found - expected} trailing bytes after the data"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header)
    # astype copies: the result owns writable memory, in the machine's byte order.
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
