"""Checkpoints that carry the current (possibly shrunk) shapes, written atomically.

A checkpoint holds the model's state_dict (whose tensors have the current widths), the width
of every layer, the optimizer's and the Simplifier's state, the RNG states and any extra
values. ``load`` resizes the Parameters of a freshly built full-size model to the saved shapes
before loading, so a simplified model can be restored, evaluated and trained further.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .prune import sync_shapes_

__all__ = ["save", "load"]

FORMAT = "meprop-checkpoint/1"


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global RNG users seed)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    simplifier=None,
    **extra: Any,
) -> Path:
    """Write a checkpoint atomically: to a temporary file beside ``path``, then rename.

    Args:
        path: destination file.
        model: the model; its state_dict is saved with the current shapes.
        optimizer: optional; its state_dict is saved.
        simplifier: optional ``Simplifier``; its counts and schedule position are saved.
        **extra: plain values (epoch, step, metrics, constructor arguments, ...) returned by
            ``load``.

    Returns:
        The path written.

    Example:
        >>> import meprop, tempfile, os
        >>> m = nn.Linear(3, 2)
        >>> p = meprop.save(os.path.join(tempfile.mkdtemp(), "ckpt.pt"), m, epoch=1)
        >>> meprop.load(p, nn.Linear(3, 2))["epoch"]
        1
    """
    path = Path(path)
    state = model.state_dict()
    payload = {
        "format": FORMAT,
        "model": state,
        "shapes": {name: list(t.shape) for name, t in state.items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "simplifier": None if simplifier is None else simplifier.state_dict(),
        "rng": _rng_state(),
        "extra": extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: a crash leaves the old file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resize_to_(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give ``model``'s parameters and buffers the saved shapes, then sync module attributes."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is not None and list(t.shape) != list(shape):
            if isinstance(t, nn.Parameter):
                t.data = t.data.new_empty(shape)
                t.grad = None
            else:  # a buffer: replace it on its owning module
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, t.new_empty(shape))
    sync_shapes_(model)


def load(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    simplifier=None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by ``save`` into ``model`` (and optimizer, simplifier).

    The model may be freshly built at full size: its layers are first resized to the saved
    widths. Returns the ``extra`` values given to ``save``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a meprop checkpoint (expected format {FORMAT!r})")
    resize_to_(model, payload["shapes"])
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    if simplifier is not None:
        if payload["simplifier"] is None:
            raise ValueError(f"{path} holds no Simplifier state")
        simplifier.load_state_dict(payload["simplifier"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return payload["extra"]
