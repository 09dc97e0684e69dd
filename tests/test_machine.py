"""meprop.machine: CPU model, SIMD level and cache sizes, from real and synthetic files."""

import pytest
import torch

from meprop import machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2 bmi2
"""


@pytest.mark.parametrize(
    "flags,expected",
    [
        ("sse sse2 avx avx2 fma avx512f avx512bw", "AVX-512"),
        ("sse sse2 avx avx2 fma", "AVX2"),
        ("sse sse2 avx avx2", "AVX"),  # AVX2 without FMA: not the AVX2 level
        ("sse sse2 avx", "AVX"),
        ("sse sse2 ssse3", "SSE only"),
        ("fp asimd evtstrm", "NEON"),
        ("fp asimd sve", "SVE"),
    ],
)
def test_isa_levels(flags, expected):
    assert machine.isa(frozenset(flags.split()), machine="x") == expected


def test_isa_without_flags_names_the_machine():
    assert machine.isa(frozenset(), machine="riscv64") == "riscv64"
    assert machine.isa(frozenset(), machine="aarch64") == "NEON"


def test_cpuinfo_parsing(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert machine.cpu_model(path) == "AMD EPYC 7B13"
    assert {"avx2", "fma", "sse2"} <= machine.cpu_flags(path)
    assert machine.isa(machine.cpu_flags(path)) == "AVX2"
    missing = tmp_path / "none"
    assert machine.cpu_flags(missing) == frozenset()
    assert machine.cpu_model(missing)  # the platform's name, never an error


def test_cache_sizes(tmp_path):
    for i, (level, kind, size) in enumerate(
        [
            (1, "Data", "32K"),
            (1, "Instruction", "32K"),
            (2, "Unified", "1024K"),
            (3, "Unified", "32M"),
        ]
    ):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    (tmp_path / "index9").mkdir()  # unreadable entries are skipped
    assert machine.cache_sizes(tmp_path) == {
        "L1d": 32 << 10,
        "L1i": 32 << 10,
        "L2": 1 << 20,
        "L3": 32 << 20,
    }
    assert machine.cache_sizes(tmp_path / "absent") == {}


def test_summary_of_this_machine():
    s = machine.cpu_summary()
    assert set(s) == {"model", "isa", "l2_bytes", "l3_bytes", "threads"}
    assert s["threads"] == torch.get_num_threads() and s["model"] and s["isa"]
    line = machine.summary_line(s)
    assert s["model"] in line and s["isa"] in line and "torch thread" in line


def test_summary_line_format():
    s = dict(model="CPU X", isa="AVX2", l2_bytes=512 << 10, l3_bytes=None, threads=1)
    assert machine.summary_line(s) == "CPU X; AVX2; L2 512 KiB; 1 torch thread"
    s.update(l3_bytes=16 << 20, threads=2)
    assert machine.summary_line(s) == "CPU X; AVX2; L2 512 KiB, L3 16 MiB; 2 torch threads"
