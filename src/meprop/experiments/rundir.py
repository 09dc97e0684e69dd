"""A run folder: atomic writes, the log, the run's identity, the lock, and the checks that
refuse a folder that does not fit the request (another run there, nothing to resume, other
settings, a lost checkpoint). The folder's files are listed in ``meprop.experiments.train``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from meprop import checkpoint

from .errors import ConfigError, RunDirError
from .run_config import TrainConfig

__all__ = [
    "RunDirError", "write_atomic", "json_line", "read_log", "repair_log", "EXTENDABLE",
    "run_identity", "settings_diff", "describe_diff", "check_identity", "run_lock",
    "ranks_lock", "has_records", "check_run_dir", "remove_stray_files", "saved_extra",
    "saved_step", "out_dir_checked",
]  # fmt: skip


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: a kill leaves the old file or the new one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = checkpoint.write_error(path, e)
        if error is not None:
            raise error from None
        raise


def json_line(path: Path, record: dict) -> None:
    """Append one record in one write (a kill may tear only the last line: see repair_log)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise checkpoint.write_error(path, e) from None


def read_log(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a log.jsonl, and a note for each line that is not one (a torn line, a
    damaged one): the valid lines before and after it are kept."""
    records, notes = [], []
    if not path.exists():
        return records, notes
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            notes.append(f"{path} line {number} is not a log record (torn or damaged): left out")
            continue
        records.append(record)
    return records, notes


def repair_log(path: Path, step: int) -> list[str]:
    """Keep the log records of the checkpoint's steps (``step <= step``): those written after
    the checkpoint that a resume continues from are written again. A damaged line is dropped
    and named (the returned notes); the valid lines around it are kept."""
    records, notes = read_log(path)
    keep = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return notes


#: Settings that a resume may change (a larger --epochs extends the run): not part of a run's
#: identity.
EXTENDABLE = ("epochs",)
#: Settings added after run identities were: at their default they are left out of a run's
#: identity, so the checkpoints of earlier runs still match their config.json.
ADDED = {"model": "mlp", "bn_batches": 0, "inner_only": False}


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What every checkpoint of a run carries: a hash of the settings that define the run
    (all of them but ``EXTENDABLE``), the seed, and the settings themselves (to name what
    differs)."""
    import hashlib

    settings = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in EXTENDABLE and not (k in ADDED and v == ADDED[k])
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": digest, "seed": cfg.seed, "settings": settings}


def settings_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings whose values differ between two config dicts: {name: (a's, b's)}."""
    return {k: (a.get(k), b.get(k)) for k in {**a, **b} if a.get(k) != b.get(k)}


def describe_diff(diff: dict[str, tuple[Any, Any]], there: str, here: str) -> str:
    """``hidden: [50] there, [80] here; seed: ...`` for ``settings_diff``'s result."""
    return "; ".join(
        f"{k}: {json.dumps(a)} {there}, {json.dumps(b)} {here}"
        for k, (a, b) in sorted(diff.items())
    )


def check_identity(path: Path, extra: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse (``RunDirError``) a checkpoint written by a run other than ``cfg``'s (another
    seed, other settings): a copied-in or stale file would otherwise be continued as this
    run. Checkpoints of versions before run identities pass."""
    saved = extra.get("run")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return
    mine = run_identity(cfg)
    if saved.get("id") == mine["id"]:
        return
    diff = settings_diff(saved["settings"], mine["settings"]) or {
        "id": (saved.get("id"), mine["id"])
    }
    raise RunDirError(
        f"{path} was written by another run than the one in config.json: "
        f"{describe_diff(diff, f'in {path.name}', 'in config.json')}. Put back the run's own "
        f"{path.name} and config.json, or start a new run in another --out"
    )


def out_dir_checked(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    _check_out_path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(
            f"--out {out} is a file, not a folder: choose another --out (a run folder)"
        ) from None
    except OSError as e:
        raise RunDirError(
            f"cannot create the run folder {out}: {e.strerror}: choose another --out"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirError(f"the run folder {out} is not writable: choose another --out")
    return out


def _flock(path: Path, mode: int, create: bool = True) -> int | None:
    """An open descriptor of ``path`` holding ``flock`` ``mode`` (non-blocking), or None
    (held by another; without ``create``, a missing file counts as free: -1)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def run_lock(out_dir: str | Path):
    """Hold the run folder's lock (``.lock``, an exclusive ``flock``) while the block runs.

    A second run on the same folder is refused with ``RunDirError`` instead of writing into
    it. The lock goes with the process that holds it, however it ends (a kill included). The
    ranks of a ``--nproc`` run hold ``.ranks.lock`` (``ranks_lock``) besides their launcher's
    ``.lock``: ranks still ending after their launcher was killed keep the folder refused."""
    import fcntl

    out = out_dir_checked(out_dir)
    fd = _flock(out / ".lock", fcntl.LOCK_EX)
    if fd is None:
        holder = (out / ".lock").read_text(errors="replace").strip() or "?"
        raise RunDirError(
            f"{out} is in use by another run (process {holder}): wait for it to end, or "
            "choose another --out"
        )
    try:
        ranks = _flock(out / ".ranks.lock", fcntl.LOCK_EX, create=False)
        if ranks is None:
            raise RunDirError(
                f"{out} is in use by the processes of a multi-process run whose launcher "
                "ended: wait a moment for them to end, or choose another --out"
            )
        if ranks >= 0:
            os.close(ranks)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        os.close(fd)


@contextmanager
def ranks_lock(out_dir: str | Path):
    """Held by every rank of a run whose launcher holds ``run_lock`` (a shared ``flock``)."""
    import fcntl

    out = out_dir_checked(out_dir)
    fd = _flock(out / ".ranks.lock", fcntl.LOCK_SH)
    if fd is None:  # pragma: no cover - run_lock holds it only for an instant
        raise RunDirError(f"{out} is in use by another run: choose another --out")
    try:
        yield out
    finally:
        os.close(fd)


def has_records(log: Path) -> int:
    """How many non-empty lines ``log`` holds (0 where it is absent)."""
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if line.strip())
    except FileNotFoundError:
        return 0
    except IsADirectoryError:
        raise RunDirError(f"{log} is a folder, not a run's log: choose another --out") from None


def check_run_dir(
    cfg: TrainConfig, out_dir: str | Path, resume: bool, restart: bool = False
) -> TrainConfig | None:
    """Refuse a run folder that does not fit the request (``RunDirError``): a new run where one
    is already (without ``resume``; a folder whose run never logged a record, such as one
    stopped while starting, is started again), ``resume`` where there is no run, ``resume``
    with settings other than the run's (only ``epochs`` may change, to extend it), or
    ``resume`` of a run that logged evaluations but lost its ``last.pt`` (``restart``: start
    it again from step 0). Returns the run's saved config on resume (None for a new run).
    Reads only."""
    out = Path(out_dir)
    cfg_path = out / "config.json"
    _check_out_path(out)
    records = has_records(out / "log.jsonl") if out.is_dir() else 0
    if not resume:
        if records or (out / "last.pt").exists():
            raise RunDirError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        return None
    if not cfg_path.exists():
        raise RunDirError(
            f"--resume: {out} holds no run to resume (no config.json): check --out, or drop "
            "--resume to start a new run there"
        )
    try:
        saved = TrainConfig.from_file(cfg_path)
    except ConfigError as e:
        raise RunDirError(f"--resume: {e}") from None
    diff = {
        k: (v, getattr(cfg, k))
        for k, v in saved.to_dict().items()
        if k != "epochs" and v != cfg.to_dict()[k]
    }
    if diff:
        raise RunDirError(
            f"--resume with settings that differ from {cfg_path}: "
            + ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
            + " (only --epochs may change): drop those flags, or start a new run elsewhere"
        )
    # A kill between the first log record and the first checkpoint leaves one record and no
    # last.pt: started again. More records (or a finished run) without last.pt: it was lost.
    lost = not (out / "last.pt").exists() and (records > 1 or (out / "summary.json").exists())
    if lost and not restart:
        raise RunDirError(
            f"--resume: {out} holds a run with {records} logged evaluation"
            f"{'s' * (records != 1)} but no last.pt to continue from: put its last.pt back, "
            "or pass --restart to train it again from step 0 (its log is replaced)"
        )
    return saved


def _check_out_path(out: Path) -> None:
    """Refuse an --out that cannot be a run folder: a file, a dangling symbolic link, a loop."""
    try:
        os.stat(out)
    except FileNotFoundError:
        if out.is_symlink():
            raise RunDirError(
                f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist: "
                "create that folder, or choose another --out"
            ) from None
        return
    except OSError as e:  # ELOOP (a link loop), ENAMETOOLONG, ...
        raise RunDirError(f"--out {out}: {e.strerror}: choose another --out") from None
    if not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: choose another --out")


def remove_stray_files(out: Path) -> None:
    """Temporary files of writes that a kill interrupted (checkpoints, config, log)."""
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def saved_extra(path: Path) -> dict[str, Any]:
    """A checkpoint's extra values ({} where it cannot be read: its load says why, later)."""
    try:
        extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
    except Exception:  # noqa: BLE001 - torch raises many kinds for a bad file
        return {}
    return extra if isinstance(extra, dict) else {}


def saved_step(path: Path) -> int | str:
    """The step a checkpoint was written at, or "?" (only for a message)."""
    state = saved_extra(path).get("state")
    return state.get("step", "?") if isinstance(state, dict) else "?"
