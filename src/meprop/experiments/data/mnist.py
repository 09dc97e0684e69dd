"""MNIST and Fashion-MNIST as tensors, with the papers' split.

The first ``dev_size`` (5,000) training images are the dev set and the rest the training set;
the 10,000 test images are the test set. Images are float32 in [0, 1], flattened to (N, 784);
labels are int64.
"""

from __future__ import annotations

import operator
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .download import ensure_file
from .idx import read_idx
from .paths import DataError

__all__ = ["MNIST_NAMES", "MnistData", "Split", "load_mnist"]

#: Accepted ``name`` values of :func:`load_mnist` -> the dataset's folder under a data root.
MNIST_NAMES = {
    "mnist": "mnist",
    "fashion": "fashion_mnist",
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
}

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_NUM_CLASSES = 10


class Split(NamedTuple):
    """One split: images (N, H*W) float32 in [0, 1] and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class MnistData:
    """The three splits of MNIST or Fashion-MNIST; ``data["dev"]`` also works."""

    name: str
    train: Split
    dev: Split
    test: Split
    num_classes: int = _NUM_CLASSES

    def __getitem__(self, split: str) -> Split:
        if split not in ("train", "dev", "test"):
            raise KeyError(f"unknown split {split!r}; the splits are 'train', 'dev', 'test'")
        return getattr(self, split)


# Decoded (images, labels) arrays, keyed by the files' identity: decompressing and decoding
# the 60,000 training images takes about a second, and runs load the same data repeatedly.
# The arrays are read-only and never handed out: every load builds fresh tensors from them.
_ARRAYS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_ARRAYS_LOCK = threading.Lock()


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    key = (_identity(images_path), _identity(labels_path))
    with _ARRAYS_LOCK:
        cached = _ARRAYS.get(key)
    if cached is not None:
        return cached

    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, rows, cols), got "
            f"{images.dtype} {images.shape}. Fix: point the data root at the original files."
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} "
            f"{labels.shape}. Fix: point the data root at the original files."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{len(images)} images in {images_path} but {len(labels)} labels in {labels_path}: "
            "the counts must match. Fix: use the image and label files of the same release."
        )
    if len(labels) and int(labels.max()) >= _NUM_CLASSES:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} is out of range 0-{_NUM_CLASSES - 1}"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    with _ARRAYS_LOCK:
        _ARRAYS[key] = (images, labels)
    return images, labels


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    # New float32/int64 arrays: the tensors never alias the cached uint8 arrays.
    # An explicit width: reshape(0, -1) is ambiguous for an empty dev split.
    x = images.reshape(len(images), int(np.prod(images.shape[1:]))).astype(np.float32)
    x /= 255.0
    return Split(torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)))


def load_mnist(
    name: str = "mnist",
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    dev_size: int = 5000,
    *,
    base_url: str | None = None,
) -> MnistData:
    """Load MNIST (``name="mnist"``) or Fashion-MNIST (``name="fashion"``).

    ``root`` is a data root (``--data-dir``); without it ``$MEPROP_DATA`` and then the user
    cache are used (see :func:`meprop.experiments.data.resolve_data_root`). Missing files are downloaded
    and checked unless ``download=False``. The first ``dev_size`` training images form the dev
    split, the rest the train split (55,000 / 5,000 / 10,000 with the default).
    """
    folder = MNIST_NAMES.get(name)
    if folder is None:
        raise ValueError(
            f"unknown dataset name {name!r}; use 'mnist' or 'fashion' "
            f"(also accepted: {', '.join(sorted(MNIST_NAMES))})"
        )

    def fetch(filename: str) -> Path:
        return ensure_file(folder, filename, root, download, base_url=base_url)

    train_images, train_labels = _read_pair(*(fetch(f) for f in _FILES["train"]))
    test_images, test_labels = _read_pair(*(fetch(f) for f in _FILES["test"]))

    n_train = len(train_images)
    try:
        n_dev = operator.index(dev_size)  # ints and NumPy ints; not floats
    except TypeError:
        n_dev = -1  # reported below
    if not 0 <= n_dev < n_train:
        raise ValueError(
            f"dev_size={dev_size!r} is out of range: it must be an integer from 0 to "
            f"{n_train - 1} (the training set has {n_train} images); the papers use 5000"
        )
    return MnistData(
        name=folder,
        train=_to_split(train_images[n_dev:], train_labels[n_dev:]),
        dev=_to_split(train_images[:n_dev], train_labels[:n_dev]),
        test=_to_split(test_images, test_labels),
    )
