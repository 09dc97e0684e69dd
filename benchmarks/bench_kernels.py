"""Time the numba CPU kernels of meprop.kernels.cpu against their PyTorch equivalents.

For each shape (M examples, n outputs, `in` inputs, k kept per row), in one run:

* selection: ``g.abs().topk(k, dim=1)`` vs ``topk_rows(g, k)``
* dx:        dense ``g @ W``            vs ``rows_matmul(idx, vals, W)``
* dW:        dense ``g.t() @ x``        vs ``rows_outer(idx, vals, x, n)`` (row-compact) and
             ``rows_outer_dense`` (n, in)
* total:     topk + both dense products vs topk_rows + rows_matmul + rows_outer

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange(min_run_time=0.3)`` in
microseconds; ratios are torch / ours (above 1: the kernel is faster). The kernels are called
through their Python functions (no dispatcher); the last table shows what calling them as
``torch.ops.meprop.*`` adds per call. On a shared machine only ratios from one run compare.

    python benchmarks/bench_kernels.py            # the full grid (about a minute)
    python benchmarks/bench_kernels.py --quick    # a small subset
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.benchmark import Timer

from meprop.kernels import cpu

FULL = [(m, 500, 500, k) for m in (1, 10, 100, 256) for k in (10, 20, 80)] + [
    (m, 4096, 4096, k) for m in (32, 256) for k in (32, 64)
]
QUICK = [(10, 500, 500, 20), (100, 500, 500, 20), (32, 4096, 4096, 32)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def us(stmt: str, min_run_time: float, **env) -> float:
    """Median time of ``stmt`` in microseconds."""
    timer = Timer(stmt, globals=env)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def bench_shape(m: int, n: int, d: int, k: int, dtype: torch.dtype, mrt: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(m, n, generator=gen, dtype=dtype)
    w = torch.randn(n, d, generator=gen, dtype=dtype)
    x = torch.randn(m, d, generator=gen, dtype=dtype)
    idx, vals = cpu.topk_rows(g, k)
    env = dict(g=g, w=w, x=x, k=k, n=n, idx=idx, vals=vals, cpu=cpu)
    r = {
        "topk_t": us("g.abs().topk(k, dim=1)", mrt, **env),
        "topk": us("cpu.topk_rows(g, k)", mrt, **env),
        "mm_t": us("g @ w", mrt, **env),
        "mm": us("cpu.rows_matmul(idx, vals, w)", mrt, **env),
        "outer_t": us("g.t() @ x", mrt, **env),
        "outer": us("cpu.rows_outer(idx, vals, x, n)", mrt, **env),
        "dense": us("cpu.rows_outer_dense(idx, vals, x, n)", mrt, **env),
    }
    r["total_t"] = r["topk_t"] + r["mm_t"] + r["outer_t"]
    r["total"] = r["topk"] + r["mm"] + r["outer"]
    return r


def bench_dispatch(dtype: torch.dtype, mrt: float) -> list[tuple[str, float, float]]:
    """Per-call cost of the Python functions vs torch.ops.meprop.* on a tiny problem."""
    g = torch.randn(1, 500, dtype=dtype)
    w, x = torch.randn(500, 500, dtype=dtype), torch.randn(1, 500, dtype=dtype)
    idx, vals = cpu.topk_rows(g, 10)
    env = dict(g=g, w=w, x=x, idx=idx, vals=vals, cpu=cpu, ops=torch.ops.meprop)
    rows = []
    for name, args in [
        ("topk_rows", "g, 10"),
        ("rows_matmul", "idx, vals, w"),
        ("rows_outer", "idx, vals, x, 500"),
    ]:
        rows.append(
            (name, us(f"cpu.{name}({args})", mrt, **env), us(f"ops.{name}({args})", mrt, **env))
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the shapes")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    mrt = args.min_run_time

    import numba

    t0 = time.perf_counter()
    cpu.warmup((dtype,))  # compile (or load from the cache) before timing anything
    compile_s = time.perf_counter() - t0
    print(f"torch {torch.__version__}, numba {numba.__version__}, {args.dtype}")
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}")
    print(f"numba threading layer: {numba.threading_layer()}; kernels ready in {compile_s:.2f} s")
    print("times in us; x = torch / ours (above 1: the kernel is faster)\n")

    head = (
        f"{'M':>4} {'n':>5} {'in':>5} {'k':>3} | {'topk':>8} {'ours':>7} {'x':>5} | "
        f"{'g@W':>8} {'ours':>7} {'x':>5} | {'gT@x':>8} {'ours':>7} {'x':>5} "
        f"{'dense':>7} {'x':>5} | {'total':>8} {'ours':>7} {'x':>5}"
    )
    print(head)
    print("-" * len(head))
    for m, n, d, k in QUICK if args.quick else FULL:
        r = bench_shape(m, n, d, k, dtype, mrt)
        print(
            f"{m:>4} {n:>5} {d:>5} {k:>3} | "
            f"{r['topk_t']:>8.1f} {r['topk']:>7.1f} {r['topk_t'] / r['topk']:>5.1f} | "
            f"{r['mm_t']:>8.1f} {r['mm']:>7.1f} {r['mm_t'] / r['mm']:>5.1f} | "
            f"{r['outer_t']:>8.1f} {r['outer']:>7.1f} {r['outer_t'] / r['outer']:>5.1f} "
            f"{r['dense']:>7.1f} {r['outer_t'] / r['dense']:>5.1f} | "
            f"{r['total_t']:>8.1f} {r['total']:>7.1f} {r['total_t'] / r['total']:>5.1f}",
            flush=True,
        )

    print("\nper-call cost at M=1, n=in=500, k=10 (us): Python function vs torch.ops.meprop")
    for name, direct, op in bench_dispatch(dtype, mrt):
        print(f"  {name:<12} {direct:>7.1f} {op:>7.1f}  (+{op - direct:.1f})")


if __name__ == "__main__":
    main()
