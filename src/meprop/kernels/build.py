"""Building and loading the C++ kernels (``native.cpp``): compiler flags, the -march level,
the on-disk cache, and the lookup of the library's functions (``meprop.kernels.native`` wraps
them).

``$CXX`` (default ``g++``) with ``-O3 -march=native -fopenmp -shared`` (and
``-fno-math-errno``; then without OpenMP,
then without ``-march=native``, if those fail), about 2 s, once per machine and source
version. ``$MEPROP_MARCH`` sets another ``-march`` (``x86-64-v3``: AVX2, ``x86-64``: SSE2); a
level this CPU cannot run is refused. The vector width follows the target (64 bytes with
AVX-512, 32 with AVX2, 16 otherwise); ``build_info()`` reports it. The library is cached in
``$MEPROP_CACHE`` (default ``~/.cache/meprop``) under a name that hashes the source, the
compiler, the flags and the CPU's feature flags, written atomically (so concurrent builds are
safe), with its size and SHA-256 beside (``.sha256``): a library that does not match them
(truncated, overwritten) is built again before anything loads it. A build that failed is
remembered (``.failed``) only where the compiler rejected the code or flags, for the same
environment; a failure of the environment (a full disk, a kill, a timeout) is retried by the
next process, and ``forget_failures()`` (``meprop info --clear``) forgets them all.
``MEPROP_NATIVE=0`` turns it off. Where no compiler works, ``available()`` is False
and meprop uses the numba kernels, or PyTorch ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = [
    "SOURCE",
    "available",
    "build_error",
    "build_info",
    "cache_dir",
    "check_march",
    "cpu_supports",
    "flag_sets",
    "forget_failures",
    "SettingError",
    "kernel",
    "march",
    "use_build",
]

SOURCE = Path(__file__).with_name("native.cpp")

# x86-64 micro-architecture levels (as GCC's -march names them) and the /proc/cpuinfo flags
# each needs on top of the one below: a library built for a level the CPU lacks would die on
# an illegal instruction, so such a build is refused before it is loaded.
X86_LEVELS = {
    "x86-64": (),
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


class SettingError(ValueError):
    """An environment variable of meprop's with a bad value (``MEPROP_MARCH``,
    ``MEPROP_BACKEND``): one line on the command line, naming the value and the fix."""

    user_mistake = True


def march() -> str:
    """The ``-march`` of the default build: ``$MEPROP_MARCH``, else ``native`` (this CPU).

    ``MEPROP_MARCH=x86-64-v3`` builds AVX2 kernels (for a binary that must run on any CPU of
    the last decade, or to measure them on a machine with AVX-512); ``x86-64`` builds SSE2 ones.
    """
    name = os.environ.get("MEPROP_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise SettingError(
            f"MEPROP_MARCH={name!r} is not a -march name: unset it, or give one of native, "
            f"{', '.join(X86_LEVELS)}"
        )
    return name


def check_march() -> None:
    """Refuse (``SettingError``) a ``$MEPROP_MARCH`` that this CPU cannot run or that the
    compiler does not know, so that a run never trains without the kernels it asked for.
    Builds the kernels (once per machine) where the variable is set."""
    arch = march()
    if not os.environ.get("MEPROP_MARCH", "").strip() or arch == "native":
        return
    if os.environ.get("MEPROP_NATIVE", "1") == "0":
        return
    levels = ", ".join(X86_LEVELS)
    if cpu_supports(arch) is False:
        raise SettingError(
            f"MEPROP_MARCH={arch}: this CPU cannot run code built for it: unset it, or give a "
            f"level it runs (native, {levels})"
        )
    if _load(arch) is None and "march" in (_errors.get(arch) or ""):
        raise SettingError(
            f"MEPROP_MARCH={arch}: the compiler does not know -march={arch}: unset it, or give "
            f"one of native, {levels}"
        )


def flag_sets(arch: str) -> list[list[str]]:
    """Compiler flags tried in turn: a compiler without OpenMP builds serial kernels, and for
    ``native`` one without -march=native (some non-x86 compilers) builds portable ones.
    ``-fno-math-errno``: ``std::sqrt`` need not set errno, so loops that take square roots
    (LazyAdam's row update) vectorize (8 floats per instruction with AVX2 instead of one)."""
    flags = ["-O3", f"-march={arch}", "-std=c++17", "-fno-math-errno", "-shared", "-fPIC",
             "-fopenmp"]  # fmt: skip
    sets = [flags, [f for f in flags if f != "-fopenmp"]]
    if arch == "native":
        sets.append([f for f in flags if f not in ("-fopenmp", "-march=native")])
    return sets


def cpu_supports(arch: str) -> bool | None:
    """Whether this CPU runs code built with ``-march=arch``: True/False for ``native`` and the
    x86-64 levels, None (unknown) for other names."""
    if arch == "native":
        return True
    if arch not in X86_LEVELS:
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = set(_cpu_flags().split(":", 1)[-1].split())
    levels = list(X86_LEVELS)
    needed = [f for lvl in levels[: levels.index(arch) + 1] for f in X86_LEVELS[lvl]]
    return all(f in flags for f in needed)


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}  # -march -> its loaded library
_errors: dict[str, str] = {}  # -march -> why it did not build or load
_active: list[str] = []  # the build that the kernels run (use_build), else march()


# --------------------------------------------------------------------------------------------
# Build and load


def cache_dir() -> Path:
    if os.environ.get("MEPROP_CACHE"):
        return Path(os.environ["MEPROP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meprop"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


# What a compiler's failure may owe to the environment rather than to the code and flags: such a
# failure is not remembered (the next process tries again).
_TRANSIENT = (
    "no space left", "disk quota", "file too large", "read-only file system", "permission denied",
    "killed", "signal", "cannot allocate memory", "memory exhausted", "final close failed",
    "cannot open output", "input/output error", "resource temporarily unavailable",
)  # fmt: skip


def _environment() -> str:
    """What besides the key may decide whether a build works: a remembered failure counts only
    while this is the same."""
    names = ("PATH", "CPATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH", "LD_LIBRARY_PATH", "TMPDIR")
    text = "\0".join(os.environ.get(n, "") for n in names)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _elf_complete(lib: Path) -> bool:
    """Whether ``lib`` is a 64-bit little-endian ELF file as long as its header says (its
    section headers, last in the file, end where it ends)."""
    with open(lib, "rb") as f:
        head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return False
    shoff = int.from_bytes(head[0x28:0x30], "little")
    shentsize = int.from_bytes(head[0x3A:0x3C], "little")
    shnum = int.from_bytes(head[0x3C:0x3E], "little")
    return shoff + shentsize * shnum == lib.stat().st_size


def _verified(lib: Path) -> bool:
    """Whether the cached library has the size and SHA-256 recorded when it was built (a
    truncated or overwritten file would crash the process that loads it: a bus error). A
    library of an older version, without a record, passes where it is a whole ELF file
    (then its record is written)."""
    record_path = lib.with_suffix(".sha256")
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        try:
            if not _elf_complete(lib):
                return False
            with contextlib.suppress(OSError):
                _write_atomic(record_path, json.dumps(_digest(lib)) + "\n")
            return True
        except OSError:
            return False
    except (OSError, ValueError):
        return False
    try:
        return isinstance(record, dict) and _digest(lib) == {
            "size": record.get("size"),
            "sha256": record.get("sha256"),
        }
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remembered(failed: Path) -> str | None:
    """A failure of a build remembered from an earlier process, where it still holds: the
    compiler rejected the code or flags, in the same environment."""
    try:
        record = json.loads(failed.read_text())
    except (OSError, ValueError):
        return None  # (markers of older versions, without an environment, are tried again)
    if not isinstance(record, dict) or record.get("environment") != _environment():
        return None
    return record.get("error") if isinstance(record.get("error"), str) else None


def forget_failures() -> list[Path]:
    """Forget every failed build (the cache's ``.failed`` markers and this process's reasons):
    the next use tries again. Returns the markers removed."""
    removed = []
    folder = cache_dir()
    if folder.is_dir():
        for marker in folder.glob("meprop_native_*.failed"):
            with contextlib.suppress(OSError):
                marker.unlink()
                removed.append(marker)
    with _lock:
        _errors.clear()
    return removed


def _build(cxx: str, arch: str | None = None) -> Path:
    """The compiled library for this machine and ``arch`` (default ``march()``): cached and
    verified, else built with the first set of flags that compiles (a set the compiler
    rejected here, in this environment, is not tried again: its error is kept beside)."""
    arch = arch or march()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    folder = cache_dir()
    errors = []
    for flags in flag_sets(arch):
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), cxx, version, " ".join(flags), _cpu_flags()]).encode()
        ).hexdigest()[:16]
        lib = folder / f"meprop_native_{key}.so"
        failed = lib.with_suffix(".failed")
        if lib.exists():
            if _verified(lib):
                return lib
            lib.unlink(missing_ok=True)  # damaged: built again (a loaded copy stays mapped)
        remembered = _remembered(failed) if failed.exists() else None
        if remembered is not None:
            errors.append(remembered)
            continue
        failed.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            out = subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
            )
            if out.returncode == 0:
                _write_atomic(lib.with_suffix(".sha256"), json.dumps(_digest(Path(tmp))) + "\n")
                os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
                return lib
            msg = f"{cxx} {' '.join(flags)}: exit {out.returncode}\n{out.stderr[-2000:]}"
            errors.append(msg)
            if out.returncode > 0 and not any(t in out.stderr.lower() for t in _TRANSIENT):
                record = {"environment": _environment(), "error": msg}
                with contextlib.suppress(OSError):  # (a full disk: then not remembered)
                    _write_atomic(failed, json.dumps(record) + "\n")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("\n".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i, c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {
        "topk_rows": ([p, i, i, i, p, p, c], None),
        "rows_matmul": ([p, p, i, i, p, i, i, p, c], i),
        "rows_outer": ([p, p, i, i, p, i, i, c, p, p, c], i),
        "per_example": ([p, i, i, i, p, p, i, p, p, p, c, p, p, p, i, p, c, c], i),
        "per_example_var": (
            [p, i, i, i, c, i, None, c, p, p, p, p, i, p, p, p, p, c, p, p, p, i, p, c, c],
            i,
        ),  # (None: the float type)
        "unified": ([p, i, i, i, p, p, i, p, p, p, c, p, p, i, p, c], None),
        "zero_rows": ([p, i, p, i, c, c], None),
        "top_columns": ([p, i, i, i, p], None),
        "channel_topk_mask": ([p, i, i, i, i, p, c], None),
        "conv_rows": ([p, p, p, p, i, p] + [i] * 10 + [p, p, c], i),
        "row_adam": ([p, p, p, i, i, p, i, p] + [None] * 7 + [c], i),
    }
    for name, (args, res) in sigs.items():
        for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
            fn = getattr(lib, f"meprop_{name}_{suffix}")
            fn.argtypes = [real if a is None else a for a in args]  # None: the float type
            fn.restype = res
    for name in ("meprop_vector_bytes", "meprop_l2_bytes"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = i


def _load(arch: str | None = None) -> ctypes.CDLL | None:
    """The library built for ``arch`` (default: the active build), building it if needed;
    None (reason in ``build_error(arch)``)."""
    arch = arch or (_active[-1] if _active else march())
    lib = _libs.get(arch)
    if lib is not None or arch in _errors:
        return lib
    with _lock:
        if arch in _libs or arch in _errors:
            return _libs.get(arch)
        if os.environ.get("MEPROP_NATIVE", "1") == "0":
            _errors[arch] = "disabled by MEPROP_NATIVE=0"
            return None
        if cpu_supports(arch) is False:
            _errors[arch] = f"this CPU cannot run code built with -march={arch}"
            return None
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            _errors[arch] = f"no C++ compiler: {cxx!r} not found (set CXX)"
            return None
        try:
            lib = ctypes.CDLL(str(_build(cxx, arch)))
            _declare(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            _errors[arch] = f"building {SOURCE.name} (-march={arch}) failed: {e}"
            return None
        _libs[arch] = lib
    return lib


def available(arch: str | None = None) -> bool:
    """Whether the C++ kernels (of the active build, or of ``arch``) are built (building them
    now if needed) and loaded."""
    return _load(arch) is not None


def build_error(arch: str | None = None) -> str | None:
    """Why ``available(arch)`` is False (None while it is True or has not been asked)."""
    return _errors.get(arch or (_active[-1] if _active else march()))


@contextlib.contextmanager
def use_build(arch: str):
    """Run the kernels of the library built with ``-march=arch`` inside the block (the kernel
    tests run every build this machine can run). Raises RuntimeError where it cannot load."""
    if _load(arch) is None:
        raise RuntimeError(f"no -march={arch} build: {_errors.get(arch)}")
    _active.append(arch)
    try:
        yield
    finally:
        _active.pop()


def build_info(arch: str | None = None) -> dict:
    """The build's -march, its vector width in bytes and the L2 size its blocking assumes
    (empty where it does not load)."""
    arch = arch or (_active[-1] if _active else march())
    lib = _load(arch)
    if lib is None:
        return {}
    return {
        "march": arch,
        "vector_bytes": lib.meprop_vector_bytes(),
        "l2_bytes": lib.meprop_l2_bytes(),
    }


_FNS: dict = {}  # (build, name, dtype) -> the library's function
_DEFAULT_ARCH: list[str] = []  # march(), read once: kernel() runs in every backward


def kernel(name: str, dtype: torch.dtype):
    """The library's ``meprop_<name>_<f32|f64>`` of the active build (loaded on first use)."""
    if _active:
        arch = _active[-1]
    else:
        if not _DEFAULT_ARCH:
            _DEFAULT_ARCH.append(march())
        arch = _DEFAULT_ARCH[0]
    fn = _FNS.get((arch, name, dtype))
    if fn is None:
        lib = _load(arch)
        if lib is None:
            raise RuntimeError(f"meprop's C++ kernels are unavailable: {_errors.get(arch)}")
        fn = _FNS[arch, name, dtype] = getattr(lib, f"meprop_{name}_{_SUFFIX[dtype]}")
    return fn
