"""What machine this is, for benchmark headers, the demo and per-machine choices.

Linux facts read from ``/proc/cpuinfo`` and ``/sys/devices/system/cpu/cpu0/cache``; elsewhere
(or where a file cannot be read) each function falls back to what the ``platform`` module knows,
or to None, and never raises.

    >>> s = cpu_summary()
    >>> sorted(s)
    ['isa', 'l2_bytes', 'l3_bytes', 'model', 'threads']
    >>> summary_line(s)  # doctest: +SKIP
    'AMD EPYC; AVX-512; L2 1 MiB, L3 32 MiB; 1 torch thread'
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_model", "cpu_flags", "isa", "cache_sizes", "cpu_summary", "summary_line"]

CPUINFO = Path("/proc/cpuinfo")
CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpuinfo_field(names: tuple[str, ...], cpuinfo: Path) -> str | None:
    """The value of the first line of ``cpuinfo`` whose key is one of ``names``."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in names:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (``model name``; ARM: ``Hardware`` or ``CPU part``), else the
    platform's processor or machine name."""
    name = _cpuinfo_field(("model name", "Hardware", "cpu model"), cpuinfo)
    return name or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``); empty where unknown."""
    flags = _cpuinfo_field(("flags", "Features"), cpuinfo)
    return frozenset(flags.split()) if flags else frozenset()


def isa(flags: frozenset[str] | None = None, machine: str | None = None) -> str:
    """The widest SIMD level the CPU offers, as a short label.

    x86: ``"AVX-512"`` (avx512f), ``"AVX2"`` (avx2 with fma), ``"AVX"``, ``"SSE only"``;
    ARM: ``"SVE"``, ``"NEON"``; else the machine name (``platform.machine()``), or
    ``"unknown"``.
    """
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine() if machine is None else machine
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags and "fma" in flags:
        return "AVX2"
    if "avx" in flags:
        return "AVX"
    if "sse2" in flags or "sse" in flags:
        return "SSE only"
    if "sve" in flags:
        return "SVE"
    if "asimd" in flags or "neon" in flags or machine in ("aarch64", "arm64"):
        return "NEON"
    return machine or "unknown"


def _bytes(size: str) -> int | None:
    """``"32K"``, ``"1024K"``, ``"8M"``, ``"512"`` -> bytes."""
    size = size.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
    digits = size[:-1] if size[-1:] in "KMG" else size
    try:
        return int(digits) * scale
    except ValueError:
        return None


def cache_sizes(cache_dir: Path = CACHE_DIR) -> dict[str, int]:
    """Cache sizes of CPU 0 in bytes: ``{"L1d": ..., "L1i": ..., "L2": ..., "L3": ...}``, the
    levels that ``cache_dir`` lists (empty where it does not exist). L2 and L3 are per core or
    shared as the kernel reports them (an L3 is usually shared by several cores)."""
    sizes: dict[str, int] = {}
    try:
        entries = sorted(cache_dir.glob("index*"))
    except OSError:
        return sizes
    for d in entries:
        try:
            level = (d / "level").read_text().strip()
            kind = (d / "type").read_text().strip()
            size = _bytes((d / "size").read_text())
        except OSError:
            continue
        if size is None:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        sizes[f"L{level}{suffix}"] = size
    return sizes


def cpu_summary() -> dict:
    """``{"model", "isa", "l2_bytes", "l3_bytes", "threads"}``: the CPU model, its SIMD level,
    its L2 and L3 sizes (None where unknown) and torch's intra-op thread count."""
    import torch

    caches = cache_sizes()
    return {
        "model": cpu_model(),
        "isa": isa(),
        "l2_bytes": caches.get("L2"),
        "l3_bytes": caches.get("L3"),
        "threads": torch.get_num_threads(),
    }


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def summary_line(summary: dict | None = None) -> str:
    """One line for headers: ``AMD EPYC; AVX-512; L2 1 MiB, L3 32 MiB; 1 torch thread``."""
    s = cpu_summary() if summary is None else summary
    caches = ", ".join(
        f"{name} {_size(s[key])}"
        for name, key in (("L2", "l2_bytes"), ("L3", "l3_bytes"))
        if s.get(key)
    )
    threads = f"{s['threads']} torch thread{'s' * (s['threads'] != 1)}"
    return "; ".join(part for part in (s["model"], s["isa"], caches, threads) if part)
