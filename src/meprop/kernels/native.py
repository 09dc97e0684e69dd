"""C++ CPU kernels (``native.cpp``) for meProp's backward, compiled on first use, via ctypes.

The same operations as the numba kernels of ``meprop.kernels.cpu`` (``topk_rows``,
``rows_matmul``, ``rows_outer``, ``rows_outer_dense``, same semantics, same errors), plus two
fused entry points that run a layer's whole sparse backward in one call:

* ``per_example_backward(g, x, weight, k, ...)``: per-row top-k, dx, dW (dense or row-compact)
  and the bias gradient.
* ``unified_backward(g, x, weight, k, ...)``: the k columns with the largest sum of |g|, then
  the same products from the compacted columns.

Why C++ next to numba, measured with ``benchmarks/bench_kernels.py --threads 1`` (AMD EPYC,
AVX-512; M=100 rows, n=in=500, k=20): the top-k is 2.4x faster (30 vs 70 us: AVX-512
compares into candidate lists, a branch-free exact selection among them), dx is on par (58 vs
62 us: both stream W's rows from L2 at ~17 GFMA/s), dW 1.2x (72 vs 84 us); the three
together 1.36x (160 vs 217 us), the fused call 1.46x (149 us). At n=in=4096, M=32, k=32 the
three take 1.7 ms instead of 9.2 ms, mostly from reusing dense dW buffers (``_GradPool``)
and streaming stores. One ctypes call per backward replaces three numba calls with their
array conversions, and OpenMP runs on the runtime torch already loaded (libgomp, same
soname), so the kernels share torch's thread pool instead of waking a second one.

Build: ``$CXX`` (default ``g++``) with ``-O3 -march=native -fopenmp -shared`` (then without
OpenMP, then without ``-march=native``, if those fail), about 2 s, once per machine and source
version. ``$MEPROP_MARCH`` sets another ``-march`` (``x86-64-v3``: AVX2, ``x86-64``: SSE2);
a level this CPU cannot run is refused. The vector width follows the target (64 bytes with
AVX-512, 32 with AVX2, 16 otherwise); ``build_info()`` reports it. The library is cached in ``$MEPROP_CACHE`` (default ``~/.cache/meprop``) under a name
that hashes the source, the compiler, the flags and the CPU's feature flags, written
atomically (so concurrent builds are safe). ``MEPROP_NATIVE=0`` turns it off. Where no
compiler works, ``available()`` is False and meprop uses the numba kernels, or PyTorch ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "available",
    "build_error",
    "build_info",
    "march",
    "use_build",
    "supports",
    "topk_rows",
    "rows_matmul",
    "rows_outer",
    "rows_outer_dense",
    "top_columns",
    "per_example_backward",
    "unified_backward",
    "clear_grad_pool",
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


def march() -> str:
    """The ``-march`` of the default build: ``$MEPROP_MARCH``, else ``native`` (this CPU).

    ``MEPROP_MARCH=x86-64-v3`` builds AVX2 kernels (for a binary that must run on any CPU of
    the last decade, or to measure them on a machine with AVX-512); ``x86-64`` builds SSE2 ones.
    """
    return os.environ.get("MEPROP_MARCH", "").strip() or "native"


def flag_sets(arch: str) -> list[list[str]]:
    """Compiler flags tried in turn: a compiler without OpenMP builds serial kernels, and for
    ``native`` one without -march=native (some non-x86 compilers) builds portable ones."""
    flags = ["-O3", f"-march={arch}", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
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


FUSED = True  # has per_example_backward and unified_backward (meprop.ops looks for this)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}

# Outputs from this many bytes on are allocated by numpy: it asks the kernel for huge pages
# (4 MiB and up), which makes first-touch page faults many times cheaper (a fresh 64 MiB
# float32 dW: ~3-8 ms instead of ~30 ms on the development machine), and np.zeros (calloc)
# leaves the untouched pages unwritten.
_BIG = 4 << 20
# Parallel regions only above ~30 us of serial work: waking the pool costs microseconds, and
# on a loaded machine a region waits for its slowest (descheduled) thread.
_PAR_MIN_ENTRIES = 1 << 16  # top-k: about 0.5 ns per entry
_PAR_MIN_FMAS = 1 << 19  # products: about 20 multiply-adds per ns

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


def _build(cxx: str, arch: str | None = None) -> Path:
    """The compiled library for this machine and ``arch`` (default ``march()``): cached, else
    built with the first set of flags that compiles (a set that failed here once is not
    retried: its error is kept beside)."""
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
            return lib
        if failed.exists():
            errors.append(failed.read_text())
            continue
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            out = subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300
            )
            if out.returncode == 0:
                os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
                return lib
            msg = f"{cxx} {' '.join(flags)}: exit {out.returncode}\n{out.stderr[-2000:]}"
            errors.append(msg)
            failed.write_text(msg)
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
        "unified": ([p, i, i, i, p, p, i, p, p, p, c, p, p, i, p, c], None),
        "zero_rows": ([p, i, p, i, c, c], None),
        "top_columns": ([p, i, i, i, p], None),
    }
    for name, (args, res) in sigs.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"meprop_{name}_{suffix}")
            fn.argtypes = args
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


def supports(t: Tensor) -> bool:
    """Whether the kernels accept tensors like ``t``: dense float32/float64 on the CPU."""
    return t.device.type == "cpu" and t.dtype in _SUFFIX and t.layout == torch.strided


_FNS: dict = {}  # (build, name, dtype) -> the library's function


_DEFAULT_ARCH: list[str] = []  # march(), read once: _fn runs in every backward


def _fn(name: str, dtype: torch.dtype):
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


# --------------------------------------------------------------------------------------------
# Helpers


def _float(name: str, t: Tensor) -> Tensor:
    if not supports(t):
        raise TypeError(f"{name} must be a float32/float64 CPU tensor, got {t.dtype} on {t.device}")
    return t.contiguous()


def _pairs(idx: Tensor, vals: Tensor, other: Tensor, other_name: str, rows: int):
    """Checked contiguous idx, vals (M, k) and the dense operand (rows or any, width)."""
    if idx.dim() != 2 or idx.shape != vals.shape:
        raise ValueError(
            f"idx and vals must both be (M, k), got {tuple(idx.shape)} and {tuple(vals.shape)}"
        )
    if idx.dtype != torch.int64 or idx.device.type != "cpu":
        raise TypeError(f"idx must be an int64 CPU tensor, got {idx.dtype} on {idx.device}")
    v = _float("vals", vals)
    o = _float(other_name, other)
    if o.dim() != 2 or o.dtype != v.dtype:
        raise ValueError(
            f"{other_name} must be 2-D with the dtype of vals ({vals.dtype}), got "
            f"{tuple(other.shape)} {other.dtype}"
        )
    if rows >= 0 and o.shape[0] != rows:
        raise ValueError(f"{other_name} must have M={rows} rows, got {tuple(other.shape)}")
    return idx.contiguous(), v, o


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def _raise_bad(status: int, bound: int) -> None:
    if status < 0:
        raise IndexError(f"{-status} value(s) of idx outside [0, {bound})")


def _threads(work: int, minimum: int) -> int:
    t = torch.get_num_threads()
    return t if t > 1 and work >= minimum else 1


def _numpy_block(rows: int, cols: int, dtype: torch.dtype, zero: bool) -> Tensor:
    """A (rows, cols) tensor on numpy memory (huge pages; calloc'ed when ``zero``) whose start,
    like every row of 64-byte multiple width, is 64-byte aligned, as streaming stores need."""
    nbytes = rows * cols * _ITEMSIZE[dtype]
    raw = (np.zeros if zero else np.empty)(nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return torch.from_numpy(raw[off : off + nbytes].view(_NUMPY[dtype]).reshape(rows, cols))


def _empty(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """An output (rows, cols) that the kernels write in full: from the pool when large."""
    if rows * cols * _ITEMSIZE[dtype] >= _BIG:
        return _POOL.take(rows, cols, dtype, zero=False)[0]
    return torch.empty(rows, cols, dtype=dtype)


class _GradPool:
    """dW buffers (dense, or the values of a row-sparse dW), reused once every tensor that
    shared them is gone.

    A fresh large (n, in) gradient costs page faults on every page written, and zeroing the
    pages of the rows written (~3-8 ms for a 64 MiB float32 dW here, most of meProp's
    dense-gradient backward at that size); a small one that few rows of reach costs writing
    all its zero rows (~14 us for 480 of 500 rows of 500 floats). Like a caching allocator, the pool keeps the buffers it handed
    out; once nothing else uses one (the optimizer step is done and ``.grad`` was set to None,
    or the gradient was added into an existing ``.grad``), the next backward of that shape
    takes it back and zeroes only the rows written last time, or all of it if an in-place
    operation changed it since (the tensor's version counter); a row-compact buffer is written
    in full, so it is taken back as it is. In-place writes that bypass
    the version counter (through ``.data`` or numpy) are not seen: set ``MEPROP_GRAD_POOL=0``
    if your code does that. ``clear()`` drops the buffers. Every layer of a shape holds its
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
                    big = n * d * _ITEMSIZE[dtype] >= _BIG  # (small: stay in cache)
                    _fn("zero_rows", dtype)(
                        out.data_ptr(), d, rows.data_ptr(), rows.numel(), big, 1
                    )
                e[1] = None  # until written() says which rows the kernel wrote
                return out, e, stale
            out = _numpy_block(n, d, dtype, zero=zero)
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


_POOL = _GradPool()


def clear_grad_pool() -> None:
    """Release the dense gradient buffers kept for reuse (see ``_GradPool``)."""
    _POOL.clear()


def _dense_dw(n: int, d: int, dtype: torch.dtype, touched: int, defer: bool = False):
    """A dense (n, d) output for dW, its pool entry, the rows still to zero (``defer``: by the
    kernel; see _GradPool.take) and the kernels' mode. Mode 2 writes the
    touched rows of a zero buffer from the pool (or fresh from calloc, whose untouched pages
    are never written): for large outputs, and where at most a quarter of the rows are
    ``touched`` (about; zeroing last call's rows and writing this call's beats writing all).
    Mode 1 writes every row of a new tensor (small outputs, most rows touched, in cache)."""
    if n * d * _ITEMSIZE[dtype] >= _BIG or (_POOL.enabled and 4 * touched <= n):
        return (*_POOL.take(n, d, dtype, defer=defer), 2)
    return torch.empty(n, d, dtype=dtype), None, None, 1


def _compact(rows: Tensor, dw_rows: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The first r of the rows allocated for the worst case (cap); copied when that would keep
    more than twice the memory needed alive."""
    cap = rows.shape[0]
    rows, dw_rows = rows[:r], dw_rows[:r]
    if 2 * r < cap:
        rows, dw_rows = rows.clone(), dw_rows.clone()
    return rows, dw_rows


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------------------------
# The four operations of meprop.kernels.cpu


def topk_rows(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest-magnitude entries of each row of ``g`` (M, n), 1 <= k <= n.

    Returns ``idx`` (M, k) int64 column numbers and ``vals = g.gather(1, idx)``; the order
    within a row is unspecified. NaN ranks above +-inf, which ranks above every number; among
    equal magnitudes the lower columns win.
    """
    g = _float("g", g)
    if g.dim() != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    m, n = g.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")
    idx = torch.empty(m, k, dtype=torch.int64)
    vals = torch.empty(m, k, dtype=g.dtype)
    if m:
        nt = _threads(m * n, _PAR_MIN_ENTRIES)
        _fn("topk_rows", g.dtype)(g.data_ptr(), m, n, k, idx.data_ptr(), vals.data_ptr(), nt)
    return idx, vals


def rows_matmul(idx: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    """``dx`` (M, in): dx[i] = sum_j vals[i, j] * weight[idx[i, j]] for idx, vals (M, k) and
    weight (n, in); i.e. g~ @ weight for the sparse g~ (M, n) that (idx, vals) describe."""
    i, v, w = _pairs(idx, vals, weight, "weight", -1)
    (m, k), (n, d) = i.shape, w.shape
    out = torch.empty(m, d, dtype=w.dtype)
    if m and d:
        nt = _threads(m * k * d, _PAR_MIN_FMAS)
        status = _fn("rows_matmul", w.dtype)(
            i.data_ptr(), v.data_ptr(), m, k, w.data_ptr(), n, d, out.data_ptr(), nt
        )
        _raise_bad(status, n)
    return out


def rows_outer(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """g~^T @ x in row-compact form, for the sparse g~ (M, n) that idx, vals (M, k) describe
    and x (M, in).

    Returns ``rows`` (R,) int64, the sorted distinct values of idx, and ``dw_rows`` (R, in):
    dw_rows[r] = sum of vals[i, j] * x[i] over the (i, j) with idx[i, j] == rows[r].
    """
    i, v, xc = _pairs(idx, vals, x, "x", idx.shape[0])
    _check_n(n)
    (m, k), d = i.shape, xc.shape[1]
    cap = min(n, m * k)  # R <= cap
    rows = torch.empty(cap, dtype=torch.int64)
    out = _empty(cap, d, xc.dtype)
    r = _fn("rows_outer", xc.dtype)(
        i.data_ptr(), v.data_ptr(), m, k, xc.data_ptr(), d, n, 3, out.data_ptr(), rows.data_ptr(),
        _threads(m * k * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    _raise_bad(r, n)
    return _compact(rows, out, r)


def rows_outer_dense(idx: Tensor, vals: Tensor, x: Tensor, n: int) -> Tensor:
    """g~^T @ x as a dense (n, in) tensor, zero in the rows idx never names; see rows_outer."""
    i, v, xc = _pairs(idx, vals, x, "x", idx.shape[0])
    _check_n(n)
    (m, k), d = i.shape, xc.shape[1]
    out, entry, _, mode = _dense_dw(n, d, xc.dtype, m * k)
    rows = torch.empty(n if entry is not None else 0, dtype=torch.int64)
    if n and d:
        r = _fn("rows_outer", xc.dtype)(
            i.data_ptr(), v.data_ptr(), m, k, xc.data_ptr(), d, n, mode, out.data_ptr(),
            rows.data_ptr() if entry is not None else None, _threads(m * k * d, _PAR_MIN_FMAS),
        )  # fmt: skip
        _raise_bad(r, n)
        _POOL.written(entry, rows[:r])
    return out


def top_columns(g: Tensor, k: int) -> Tensor:
    """The unified selection: the k columns of ``g`` (M, n) with the largest sum of |g| (NaN
    ranks highest), sorted; as ``meprop.ops.select_columns``, 1 <= k <= n."""
    g = _float("g", g)
    if g.dim() != 2:
        raise ValueError(f"g must be (M, n), got shape {tuple(g.shape)}")
    m, n = g.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")
    cols = torch.empty(k, dtype=torch.int64)
    _fn("top_columns", g.dtype)(g.data_ptr(), m, n, k, cols.data_ptr())
    return cols


# --------------------------------------------------------------------------------------------
# Fused backward of one linear layer


def per_example_backward(
    g: Tensor, x: Tensor, weight: Tensor, k: int, need_dx: bool, dw: str | None, need_db: bool
):
    """meProp's per-example backward of ``z = x W^T + b`` in one call, 1 <= k < n.

    Args:
        g: output gradient (M, n); x: input (M, in); weight: (n, in); all of one float dtype.
        dw: ``"dense"`` (n, in), ``"sparse"`` (row-compact) or None.

    Returns ``(idx, vals, dx, dw, db)``: the selection (M, k) each; dx (M, in) or None; dW as a
    dense tensor, as ``(rows (R,), dw_rows (R, in))`` or None; db = g.sum(0) (n,) or None.
    """
    m, n = g.shape
    d = weight.shape[1]
    dtype = g.dtype
    idx = torch.empty(m, k, dtype=torch.int64)
    vals = torch.empty(m, k, dtype=dtype)
    dx = torch.empty(m, d, dtype=dtype) if need_dx else None
    db = torch.empty(n, dtype=dtype) if need_db else None
    rows = out = entry = stale = None
    mode = 0
    if dw == "dense":
        out, entry, stale, mode = _dense_dw(n, d, dtype, m * k, defer=True)
        if entry is not None:  # the rows written, for the pool
            rows = torch.empty(n, dtype=torch.int64)
    elif dw == "sparse":
        cap = min(n, m * k)
        rows, out, mode = torch.empty(cap, dtype=torch.int64), _empty(cap, d, dtype), 3
    r = _fn("per_example", dtype)(
        g.data_ptr(), m, n, k, x.data_ptr(), weight.data_ptr(), d, idx.data_ptr(),
        vals.data_ptr(), _ptr(dx), mode, _ptr(out), _ptr(rows), _ptr(stale),
        0 if stale is None else stale.numel(), _ptr(db), _threads(m * n, _PAR_MIN_ENTRIES),
        _threads(m * k * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    if mode == 3:
        out = _compact(rows, out, r)
    elif entry is not None:
        _POOL.written(entry, rows[:r])
    return idx, vals, dx, out, db


def unified_backward(
    g: Tensor, x: Tensor, weight: Tensor, k: int, need_dx: bool, dw: str | None, need_db: bool
):
    """meProp's unified (mini-batch) backward in one call, 1 <= k < n: the k columns of ``g``
    (M, n) with the largest sum of |g| (NaN ranks highest), then the compacted products.

    Returns ``(cols, gc, dx, dw, db)``: cols (k,) sorted, gc = g[:, cols] (M, k); dx (M, in)
    or None; dW dense (n, in), as ``(cols, dw_rows (k, in))`` or None; db = g.sum(0) or None.
    """
    m, n = g.shape
    d = weight.shape[1]
    dtype = g.dtype
    cols = torch.empty(k, dtype=torch.int64)
    gc = torch.empty(m, k, dtype=dtype)
    dx = torch.empty(m, d, dtype=dtype) if need_dx else None
    db = torch.empty(n, dtype=dtype) if need_db else None
    out = entry = stale = None
    mode = 0
    if dw == "dense":
        out, entry, stale, mode = _dense_dw(n, d, dtype, k, defer=True)
    elif dw == "sparse":
        out, mode = _empty(k, d, dtype), 3
    _fn("unified", dtype)(
        g.data_ptr(), m, n, k, x.data_ptr(), weight.data_ptr(), d, cols.data_ptr(),
        gc.data_ptr(), _ptr(dx), mode, _ptr(out), _ptr(stale),
        0 if stale is None else stale.numel(), _ptr(db), _threads(m * k * d, _PAR_MIN_FMAS),
    )  # fmt: skip
    if mode == 3:
        out = (cols, out)
    _POOL.written(entry, cols)
    return cols, gc, dx, out, db
