"""Checkpoints that carry the current (possibly shrunk) shapes, written atomically.

A checkpoint holds the model's state_dict (whose tensors have the current widths), the width
of every layer, the optimizer's and the Simplifier's state, the RNG states and any extra
values, and a SHA-256 of all of it (``checksum``: every tensor's dtype, shape and bytes and
every other value, so a flipped byte anywhere is caught). ``load`` resizes the Parameters of a
freshly built full-size model to the saved shapes before loading, so a simplified model can be
restored, evaluated and trained further; it checks everything first (the file, the checksum,
that the saved tensors are the model's, shrunk only where meSimp shrinks) and touches the
model only when all fits. Every error (``CheckpointError``) names the file.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .prune import sync_shapes_

__all__ = ["save", "load", "CheckpointError", "WriteError", "write_error"]

FORMAT = "meprop-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (unreadable, corrupt, not meprop's, or of another
    model); the message names the file. A user mistake on the command line (one line)."""

    user_mistake = True


class WriteError(OSError):
    """A file that could not be written (a full disk, a file size limit, a read-only folder):
    one line on the command line, naming the path and the fix."""

    user_mistake = True


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError | None:
    """The one-line ``WriteError`` for a failed write of ``path`` (None where ``e`` is not a
    failed write: a bug, raised as it is). torch.save reports a short write as a RuntimeError
    ("unexpected pos", "file write failed"), so the free space decides what to say."""
    import errno as codes
    import shutil

    text = str(e)
    if not isinstance(e, OSError) and not (
        isinstance(e, RuntimeError) and ("unexpected pos" in text or "write failed" in text)
    ):
        return None
    path = Path(path)
    folder = path.parent
    try:
        full = shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        full = False
    code = getattr(e, "errno", None)
    fix = "then run it again (--resume continues a run from its last checkpoint)"
    if code in (codes.ENOSPC, codes.EDQUOT) or full:
        why = f"no space left on {folder} (writing {path.name})"
        fix = f"free some space, {fix}"
    elif code == codes.EFBIG:
        why = f"{path} would exceed the file size limit (ulimit -f)"
        fix = f"raise the limit, {fix}"
    elif code == codes.EROFS:
        why = f"{folder} is on a read-only file system"
        fix = "write to another folder"
    elif isinstance(e, OSError):
        why = f"cannot write {path}: {e.strerror or e}"
    else:
        why = f"cannot write {path}: the write stopped short (a full disk or a file size limit)"
        fix = f"free some space or raise the limit, {fix}"
    return WriteError(f"{why}: {fix}")


def _digest(value: Any, h=None) -> str:
    """SHA-256 of a payload's contents: tensors by dtype, shape and bytes, containers by their
    items (in order), other values by type and repr. Independent of how torch.save lays them
    out, so it can be computed again after loading."""
    top = h is None
    h = hashlib.sha256() if top else h
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_sparse:
            t = t.coalesce()
            _digest([t.indices(), t.values(), list(t.shape)], h)
        else:
            t = t.cpu().contiguous()
            h.update(f"T{t.dtype}{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k, v in value.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _digest(v, h)
    else:
        h.update(f"V{type(value).__name__}:{value!r};".encode())
    return h.hexdigest() if top else ""


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
) -> Path | None:
    """Write a checkpoint atomically: to a temporary file beside ``path``, then rename.

    The one save, in one process or in a DDP job: a ``DistributedDataParallel`` model is saved
    as the module it wraps; under an initialized ``torch.distributed`` process group, call it
    on every rank: a ``DistributedSimplifier``'s usage record is first consolidated (a
    collective), then rank 0 alone writes (the ranks' models and optimizers are identical).
    The file loads with ``load`` in any number of processes.

    Args:
        path: destination file.
        model: the model (or its DDP wrapper); its state_dict is saved with the current shapes.
        optimizer: optional; its state_dict is saved.
        simplifier: optional ``Simplifier``; its counts and schedule position are saved.
        **extra: plain values (epoch, step, metrics, constructor arguments, ...) returned by
            ``load``.

    Returns:
        The path written (None on ranks other than 0).

    Example:
        >>> import meprop, tempfile, os
        >>> m = nn.Linear(3, 2)
        >>> p = meprop.save(os.path.join(tempfile.mkdtemp(), "ckpt.pt"), m, epoch=1)
        >>> meprop.load(p, nn.Linear(3, 2))["epoch"]
        1
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if hasattr(simplifier, "consolidate"):  # meprop.distributed.DistributedSimplifier
        simplifier.consolidate()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
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
    payload["checksum"] = _digest(payload)
    _write(path, payload)
    return path


def _write(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: a crash leaves the old file
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        error = write_error(path, e)
        if error is not None:
            raise error from None
        raise


def _read(path: Path, map_location) -> dict[str, Any]:
    """The checkpoint's payload, checked: readable, meprop's format, its checksum, complete."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        reason = (str(e).strip().splitlines() or [""])[0]
        if not reason or "weights_only" in reason or "Weights only" in reason:
            reason = ""  # torch's advice to unpickle arbitrary code does not apply here
        reason = type(e).__name__ + (f": {reason[:160]}" if reason else "")
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint (truncated, corrupt, or not written by "
            f"meprop.save; {reason})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a meprop checkpoint (expected format {FORMAT!r})")
    expected = payload.pop("checksum", None)  # absent in files of older versions
    if expected is not None and _digest(payload) != expected:
        raise CheckpointError(
            f"{path} is corrupt: its contents do not match the SHA-256 stored at save time; "
            "use another copy (or an earlier checkpoint)"
        )
    for key in ("model", "shapes", "rng", "extra"):
        if key not in payload:
            raise CheckpointError(f"{path} is incomplete: no {key!r}")
    return payload


def _check_optimizer(path: Path, saved, optimizer: torch.optim.Optimizer) -> None:
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state")
    groups = [len(g["params"]) for g in saved["param_groups"]]
    if groups != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(
            f"{path} holds the state of an optimizer over other parameters (groups of "
            f"{groups} parameters, this one {[len(g['params']) for g in optimizer.param_groups]})"
        )


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


def _shrinkable(model: nn.Module) -> dict[str, set[int]] | None:
    """Which dimensions of which tensors meSimp may have shrunk: the producers' outputs (dim
    0), the consumers' inputs (dim 1), norms between, every dimension of a sparse LSTM (its
    cells). None when the model has no structure meSimp knows (then shapes must be equal)."""
    from .lstm import SparseLSTM
    from .simplify import Pair, chain_links, find_pairs

    try:
        pairs = find_pairs(model)
    except (ValueError, TypeError):
        pairs = []
    # A model built dense (a plain nn.Sequential of Linear and Conv2d layers) that loads a
    # simplified one: every Linear or Conv2d whose outputs go, through activations, pooling and
    # norms, into another Linear or Conv2d.
    layers = nn.Linear | nn.Conv2d
    for name, module, nxt, norms in chain_links(model):
        if isinstance(module, layers) and nxt is not None and isinstance(nxt[1], layers):
            pairs.append(Pair(name, (nxt[0],), norms))
    if not pairs:
        return None
    modules = dict(model.named_modules())
    dims: dict[str, set[int]] = {}

    def allow(module_name: str, dim: int | None) -> None:
        module = modules[module_name]
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            key = f"{module_name}.{name}" if module_name else name
            if dim is None or isinstance(module, SparseLSTM):
                dims.setdefault(key, set()).update(range(t.dim()))
            elif t.dim() > dim:
                dims.setdefault(key, set()).add(dim)

    for pair in pairs:
        allow(pair.producer, 0)
        for name in pair.consumers:
            allow(name, 1)
        for name in pair.norms:
            allow(name, 0)
    return dims


def _check_fits(path: Path, payload: dict, model: nn.Module) -> None:
    """Raise ``CheckpointError`` unless the saved state is this model's up to meSimp's widths:
    the same tensors, the same ranks, each dimension equal except where meSimp shrinks (the
    model may be full-size or shrunk itself). Checked on a copy of the model too (resize and load), which catches the rest."""
    saved = payload["model"]
    mine = model.state_dict()
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} holds another model's state: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; load it into a model built as the one that was saved"
        )
    shrinkable = _shrinkable(model)
    for key, t in saved.items():
        want = mine[key]
        ok = t.dim() == want.dim() and all(
            a == b or (shrinkable is not None and d in shrinkable.get(key, ()))
            for d, (a, b) in enumerate(zip(t.shape, want.shape, strict=True))
        )
        if not ok:
            raise CheckpointError(
                f"{path} holds another model: {key} has shape {list(t.shape)} there, "
                f"{list(want.shape)} in the model (meSimp shrinks hidden units only); load it "
                "into a model built with the settings it was saved with"
            )
    # The hooks' targets (timers, meAct's per-example state) are shared, not copied.
    memo = {
        id(fn): fn
        for m in model.modules()
        for name, hooks in vars(m).items()
        if name.endswith("hooks") and "state_dict" not in name and isinstance(hooks, dict)
        for fn in hooks.values()
        if callable(fn) and not isinstance(fn, nn.Module | torch.Tensor)
    }
    try:
        trial = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - a model that cannot be copied: the checks above only
        return
    try:
        resize_to_(trial, payload["shapes"])
        trial.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit the model: {e}") from None


def load(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    simplifier=None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = "cpu",
    check=None,
) -> dict[str, Any]:
    """Load a checkpoint written by ``save`` into ``model`` (and optimizer, simplifier).

    The model may be freshly built at full size: its layers are first resized to the saved
    widths. Everything is checked before the model is touched; ``CheckpointError`` (naming
    the file) when the file is unreadable, corrupt (its checksum), not a checkpoint, or of
    another model. ``check``: a callable given the ``extra`` values before anything else is
    checked or touched (it raises to refuse the file: the trainer compares the run's identity).
    Returns the ``extra`` values given to ``save``.
    """
    path = Path(path)
    payload = _read(path, map_location)
    if check is not None:
        check(payload["extra"])
    _check_fits(path, payload, model)
    if optimizer is not None:
        _check_optimizer(path, payload["optimizer"], optimizer)
    if simplifier is not None and payload["simplifier"] is None:
        raise CheckpointError(f"{path} holds no Simplifier state")
    resize_to_(model, payload["shapes"])
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if simplifier is not None:
        simplifier.load_state_dict(payload["simplifier"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return payload["extra"]
