"""The CPU kernels, one operation at a time: PyTorch vs numba (meprop.kernels.cpu) vs C++
(meprop.kernels.native), timed side by side in one run.

For each shape (M examples, n outputs, `in` inputs, k kept per row):

* select: ``g.abs().topk(k, dim=1)`` vs ``topk_rows(g, k)``
* dx:     dense ``g @ W``            vs ``rows_matmul(idx, vals, W)``
* dW:     dense ``g.t() @ x``        vs ``rows_outer_dense(idx, vals, x, n)`` (dense (n, in))
* total:  the three PyTorch ops vs the three numba calls vs the C++ fused
          ``per_example_backward`` (selection, dx, dW and the bias sum in one call)

Times in microseconds: the 10th percentile of per-call times, every operation timed in turn
in ``--rounds`` rounds, each keeping its fastest round (see ``_timing.py``), with GFLOP/s (2
flops per multiply-add of the sparse products) beside the products. The kernels are called through their Python functions; the
last table shows what calling them as ``torch.ops.meprop.*`` (the dispatcher) adds per call.
On a shared machine only ratios from one run compare.

    python benchmarks/bench_kernels.py            # the full grid
    python benchmarks/bench_kernels.py --quick    # a small subset
"""

from __future__ import annotations

import argparse
import os

import torch

from _timing import best_of_rounds, cpu_name, load_average
from meprop.kernels import cpu, native, registry

FULL = [(m, 500, 500, k) for m in (1, 10, 100, 256) for k in (10, 20, 80)] + [
    (m, 4096, 4096, k) for m in (32, 256) for k in (32, 64)
]
QUICK = [(10, 500, 500, 20), (100, 500, 500, 20), (32, 4096, 4096, 32)]


def best_us(stmts: dict, env: dict, rounds: int, mrt: float) -> dict:
    fns = {key: eval(f"lambda: {stmt}", env) for key, stmt in stmts.items()}  # noqa: S307
    return {key: 1e6 * t for key, t in best_of_rounds(fns, rounds, mrt).items()}


def bench_shape(m, n, d, k, dtype, rounds, mrt, impls) -> dict:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(m, n, generator=gen, dtype=dtype)
    w = torch.randn(n, d, generator=gen, dtype=dtype)
    x = torch.randn(m, d, generator=gen, dtype=dtype)
    idx, vals = cpu.topk_rows(g, k)
    env = dict(g=g, w=w, x=x, k=k, n=n, idx=idx, vals=vals, cpu=cpu, native=native)
    stmts = {
        ("torch", "select"): "g.abs().topk(k, dim=1)",
        ("torch", "dx"): "g @ w",
        ("torch", "dw"): "g.t() @ x",
    }
    for name in impls:
        stmts[(name, "select")] = f"{name}.topk_rows(g, k)"
        stmts[(name, "dx")] = f"{name}.rows_matmul(idx, vals, w)"
        stmts[(name, "dw")] = f"{name}.rows_outer_dense(idx, vals, x, n)"
    if "native" in impls:
        stmts[("native", "fused")] = "native.per_example_backward(g, x, w, k, True, 'dense', True)"
    r = best_us(stmts, env, rounds, mrt)
    for name in ("torch", *impls):
        r[(name, "total")] = sum(r[(name, op)] for op in ("select", "dx", "dw"))
    return r


def bench_dispatch(dtype, rounds, mrt, impl) -> list[tuple[str, float, float]]:
    """Per-call cost of the Python functions vs torch.ops.meprop.* on a tiny problem."""
    g = torch.randn(1, 500, dtype=dtype)
    w, x = torch.randn(500, 500, dtype=dtype), torch.randn(1, 500, dtype=dtype)
    idx, vals = impl.topk_rows(g, 10)
    env = dict(g=g, w=w, x=x, idx=idx, vals=vals, impl=impl, ops=torch.ops.meprop)
    calls = [
        ("topk_rows", "g, 10"),
        ("rows_matmul", "idx, vals, w"),
        ("rows_outer", "idx, vals, x, 500"),
    ]
    stmts = {}
    for name, args in calls:
        stmts[(name, "fn")] = f"impl.{name}({args})"
        stmts[(name, "op")] = f"ops.{name}({args})"
    r = best_us(stmts, env, rounds, mrt)
    return [(name, r[(name, "fn")], r[(name, "op")]) for name, _ in calls]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of the shapes")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each keeps its fastest")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    impls = [name for name, mod in (("cpu", cpu), ("native", native)) if mod.available()]
    if "cpu" in impls:
        cpu.warmup((dtype,))  # compile (or load from the cache) before timing anything
    print(f"torch {torch.__version__}, {args.dtype}; CPU: {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"torch threads {torch.get_num_threads()}; load average {load_average()}")
    print(f"implementations: {', '.join({'cpu': 'numba', 'native': 'C++'}[i] for i in impls)}")
    print("times in us (10th percentile of calls, fastest round); GF = GFLOP/s of the products\n")
    names = {"torch": "torch", "cpu": "numba", "native": "C++"}
    head = "| M | n | in | k | op | " + " | ".join(names[i] for i in ("torch", *impls))
    head += " | C++ fused |" if "native" in impls else " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for m, n, d, k in QUICK if args.quick else FULL:
        r = bench_shape(m, n, d, k, dtype, args.rounds, args.min_run_time, impls)
        flops = 2 * m * k * d
        for op in ("select", "dx", "dw", "total"):
            cells = []
            for name in ("torch", *impls):
                t = r[(name, op)]
                gf = (
                    f" ({flops / t / 1e3:.1f} GF)" if op in ("dx", "dw") and name != "torch" else ""
                )
                cells.append(f"{t:.1f}{gf}")
            fused = f"{r[('native', 'fused')]:.1f}" if op == "total" and "native" in impls else ""
            tail = f" | {fused} |" if "native" in impls else " |"
            print(f"| {m} | {n} | {d} | {k} | {op} | " + " | ".join(cells) + tail, flush=True)

    impl = registry.implementation()
    print(f"\nper-call cost at M=1, n=in=500, k=10 (us): {impl.__name__} function vs torch.ops")
    for name, direct, op in bench_dispatch(dtype, args.rounds, args.min_run_time, impl):
        print(f"  {name:<12} {direct:>7.1f} {op:>7.1f}  (+{op - direct:.1f})")


if __name__ == "__main__":
    main()
