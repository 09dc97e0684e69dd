"""Which implementation runs a layer's sparse backward: timed on first use, cached per machine.

meProp's backward can run four ways, all computing the same gradients up to the order of
floating-point sums (``meprop.ops`` defines them):

* ``native``: the fused C++ kernels (``meprop.kernels.native``), float32/float64 on the CPU;
* ``numba``: the numba kernels (``meprop.kernels.cpu``), per_example mode;
* ``torch``: PyTorch ops, the products as dense GEMMs on the compacted gradient;
* ``dense``: mask the gradient, then PyTorch's dense GEMMs (where sparsity cannot pay).

Which is fastest depends on the CPU (its vector width, caches, the BLAS torch ships), the
thread count and the shapes, so ``backend="auto"`` measures instead of guessing, as cuDNN's
benchmark mode and Triton's autotuner do: the first backward of a new *shape class* (mode,
dtype, threads, what is needed, and the octaves of batch rows, out, in and k) times every
candidate on that call's own tensors, in interleaved rounds, keeping each one's fastest call
(robust to other processes on the machine), and picks the fastest. The choice is written to a
JSON file next to the compiled kernels (``$MEPROP_CACHE``, default ``~/.cache/meprop``) whose
name hashes the machine key (CPU model and flags, torch and meprop versions, the kernels'
source and -march); later processes on that machine read it, so they run the same
implementation and stay reproducible. A corrupt file, or one of another key, is re-measured.

Environment:

* ``MEPROP_BACKEND=native|numba|torch|dense``: what ``backend="auto"`` runs, no timing (where
  that implementation cannot run a call, the untimed default order below applies).
* ``MEPROP_AUTOTUNE=0``: no timing; ``auto`` takes native, else numba, else torch.

``describe()`` (and ``meprop info``) prints the machine, the builds and the cached choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CANDIDATES", "Tuner", "tuner", "pinned", "tuning_enabled", "describe"]

CANDIDATES = ("native", "numba", "torch", "masked", "triton")
FORMAT = 1  # of the cache file

# A candidate's time is its fastest call: other processes only ever add time, so the minimum
# over enough calls, spread over interleaved rounds, is the least disturbed estimate.
ROUNDS = 5  # interleaved rounds
TARGET_S = 4e-3  # seconds of calls per candidate and round (at least one call)
MAX_CALLS = 32  # calls per candidate and round, at most
DROP = 4.0  # after the first round, candidates this many times slower than the best drop out


def pinned() -> str | None:
    """``$MEPROP_BACKEND`` when set to a candidate (None when unset or ``auto``)."""
    name = os.environ.get("MEPROP_BACKEND", "").strip().lower()
    if name in ("", "auto"):
        return None
    name = {"dense": "masked"}.get(name, name)  # (the masked backend's old name)
    if name not in CANDIDATES:
        from .build import SettingError

        raise SettingError(
            f"MEPROP_BACKEND must be one of {('auto', *CANDIDATES)}, got {name!r}; unset it to "
            f"let meprop time the candidates"
        )
    return name


def tuning_enabled() -> bool:
    """Whether ``auto`` times the candidates (``$MEPROP_AUTOTUNE`` is not ``0``)."""
    return os.environ.get("MEPROP_AUTOTUNE", "1").strip() not in ("0", "false", "no", "off")


def _octave(v: int) -> int:
    return int(v).bit_length()


def shape_class(mode: str, dtype: torch.dtype, m: int, n: int, d: int, k: int, needs: str) -> str:
    """The key of one decision: calls with the same key take the same implementation."""
    threads = torch.get_num_threads()
    dt = str(dtype).removeprefix("torch.")
    return f"{mode}/{dt}/t{threads}/{needs}/M{_octave(m)}/n{_octave(n)}/d{_octave(d)}/k{_octave(k)}"


def machine_key() -> dict:
    """What a cached choice depends on: when any of it changes, choices are measured again."""
    from .. import __version__, machine
    from . import native

    flags = " ".join(sorted(machine.cpu_flags()))
    return {
        "cpu": machine.cpu_model(),
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "meprop": __version__,
        "kernels": hashlib.sha256(native.SOURCE.read_bytes()).hexdigest()[:16],
        "march": native.march(),
        "numba": _numba_version(),
    }


def _numba_version() -> str:
    try:
        from importlib.metadata import version

        return version("numba")
    except Exception:  # noqa: BLE001 - not installed: no numba candidate
        return ""


class Tuner:
    """Choices per shape class, measured on first use and kept in one JSON file per machine key.

    Args:
        path: the cache file (default: in the kernels' cache folder, named by the key's hash).
    """

    def __init__(self, path: Path | None = None) -> None:
        from . import native

        self.key = machine_key()
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = path or native.cache_dir() / f"dispatch_{digest}.json"
        self._choices: dict[str, dict] | None = None
        self._lock = threading.Lock()
        self.measured = 0  # decisions timed by this process (for tests and describe())
        # What each call signature ran (meprop.products.pick_implementation): this process's fast path.
        self.memo: dict[tuple, str] = {}

    # ---------------------------------------------------------------------------------------
    # The file

    def _read(self) -> dict[str, dict]:
        """The file's choices; {} when missing, unreadable, corrupt or of another key."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or data.get("key") != self.key
            or not isinstance(data.get("choices"), dict)
        ):
            return {}
        return {
            k: v
            for k, v in data["choices"].items()
            if isinstance(v, dict)
            and v.get("backend") in CANDIDATES
            and isinstance(v.get("us", {}), dict)
            and all(isinstance(t, int | float) for t in v.get("us", {}).values())
        }

    def choices(self) -> dict[str, dict]:
        """Every cached choice: shape class -> {"backend", "us": {candidate: microseconds}}."""
        if self._choices is None:
            self._choices = self._read()
        return self._choices

    def _write(self, cls: str, entry: dict) -> None:
        """Add one choice to the file: merged with what other processes wrote (under a lock
        where the platform has one), then replaced atomically. Never raises: a cache that
        cannot be written only means measuring again next time."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_suffix(".lock")):
                merged = self._read()
                merged.setdefault(cls, entry)  # a choice another process wrote first stays
                self._choices = merged
                data = {"format": FORMAT, "key": self.key, "choices": merged}
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        except OSError:
            pass

    # ---------------------------------------------------------------------------------------
    # Choosing

    def choose(self, cls: str, runs: dict[str, Callable[[], object]]) -> str:
        """The candidate for shape class ``cls``: cached, else timed now with ``runs``
        (name -> a call on this backward's tensors; outputs are discarded)."""
        entry = self.choices().get(cls)
        if entry is not None and entry["backend"] in runs:
            return entry["backend"]
        if len(runs) == 1:
            return next(iter(runs))
        with self._lock:
            entry = self.choices().get(cls)
            if entry is not None and entry["backend"] in runs:
                return entry["backend"]
            times = measure(runs)
            best = min(times, key=times.get)
            entry = {"backend": best, "us": {k: round(v * 1e6, 1) for k, v in times.items()}}
            self.measured += 1
            self.choices()[cls] = entry
            self._write(cls, entry)
            return self.choices()[cls]["backend"]

    def clear(self) -> None:
        """Forget the cached choices (the file too): the next calls measure again."""
        with self._lock:
            self._choices = {}
            self.memo.clear()
            with contextlib.suppress(OSError):
                self.path.unlink()


def measure(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Seconds per call of each candidate: its fastest call over ROUNDS interleaved rounds.

    Each is called once first (warm-up: caches, buffers, lazy compilation; a candidate that
    raises is left out). Candidates over DROP times slower than the best after the first round
    are not timed again (a masked-dense backward of a large layer can take 100 ms a call).
    """
    clock = time.perf_counter
    best: dict[str, float] = {}
    for name, fn in runs.items():
        try:
            t0 = clock()
            fn()
            best[name] = clock() - t0
        except Exception:  # noqa: BLE001 - a candidate that cannot run this call is no choice
            continue
    if not best:
        raise RuntimeError(f"no implementation could run this backward (tried {list(runs)})")
    calls = {name: max(1, min(MAX_CALLS, int(TARGET_S / max(t, 1e-7)))) for name, t in best.items()}
    timed = list(best)
    for rnd in range(ROUNDS):
        for name in timed:
            fn = runs[name]
            for _ in range(calls[name]):
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
        if rnd == 0:  # (the dropped keep their time so far: reported, never the minimum)
            fastest = min(best.values())
            timed = [k for k in timed if best[k] <= DROP * fastest]
    return best


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: last writer wins
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_TUNER: Tuner | None = None


def tuner() -> Tuner:
    """The process's tuner (created on first use)."""
    global _TUNER
    if _TUNER is None:
        _TUNER = Tuner()
    return _TUNER


def describe() -> str:
    """A report of what ``backend="auto"`` runs on this machine: the CPU, the kernel builds,
    the settings and every cached choice."""
    from .. import machine
    from . import cpu, native

    lines = [f"CPU: {machine.summary_line()}; torch {torch.__version__}"]
    info = native.build_info() if native.available() else {}
    if info:
        lines.append(
            f"C++ kernels: -march={info['march']}, {info['vector_bytes']}-byte vectors, "
            f"blocking for a {info['l2_bytes'] >> 10} KiB L2"
        )
    else:
        lines.append(f"C++ kernels: unavailable ({native.build_error()})")
    lines.append(f"numba kernels: {'available' if cpu.available() else 'unavailable'}")
    pin = pinned() or os.environ.get("MEPROP_BACKEND", "").strip() or "unset"
    tune = "on" if tuning_enabled() else "off (MEPROP_AUTOTUNE=0)"
    lines.append(f"MEPROP_BACKEND: {pin}; timing of candidates: {tune}")
    t = tuner()
    choices = t.choices()
    lines.append(f"cache: {t.path} ({len(choices)} choices)")
    for cls, entry in sorted(choices.items()):
        us = ", ".join(f"{k} {v:g} us" for k, v in sorted(entry.get("us", {}).items()))
        lines.append(f"  {cls}: {entry['backend']}  ({us})")
    return "\n".join(lines)
