"""Regenerate the tiny IDX fixtures of tests/test_data.py: ``python tests/data/make_fixtures.py``.

Three 2x2 uint8 images and their labels, each raw and gzipped (with mtime 0, so reruns give
the same bytes). The CoNLL-U fixtures (``tiny.conllu``, ``malformed.conllu``) are written by
hand.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Distinct pixels, including both ends of the range, so scaling to [0, 1] is checked.
IMAGES = np.array(
    [
        [[0, 255], [128, 1]],
        [[10, 20], [30, 40]],
        [[255, 254], [0, 3]],
    ],
    dtype=np.uint8,
)
LABELS = np.array([7, 0, 9], dtype=np.uint8)

_TYPE_CODES = {np.dtype(np.uint8): 0x08}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0, 0, type code, ndim, big-endian int32 dims, data."""
    header = bytes([0, 0, _TYPE_CODES[array.dtype], array.ndim])
    dims = np.asarray(array.shape, dtype=">i4").tobytes()
    return header + dims + np.ascontiguousarray(array).tobytes()


def main() -> None:
    for stem, array in [("images-3x2x2.idx3", IMAGES), ("labels-3.idx1", LABELS)]:
        raw = idx_bytes(array)
        (HERE / stem).write_bytes(raw)
        (HERE / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
        print(f"wrote {stem} ({len(raw)} bytes) and {stem}.gz")


if __name__ == "__main__":
    main()
