"""Linear-layer backward: PyTorch's dense nn.Linear vs meProp, timed side by side in one run.

For each shape, the backward of ``y = layer(x)`` with the input requiring a gradient (as in a
hidden layer) is timed; gradients are set to None before each call, so both sides store their
gradient rather than add it. Times are the 10th percentile of per-call times, dense and every
meProp variant timed in turn in ``--rounds`` rounds, each keeping its fastest round (see
``_timing.py``: robust to other processes on the machine). Prints milliseconds, the ratio
dense / meProp and the ideal ratio n/k, with the machine, torch version, thread count, kernel
implementation and load average; then the selection alone (top-k of each row for
per_example, the column ranking for unified) against the whole meProp backward.

    python benchmarks/bench_backward.py            # the full table
    python benchmarks/bench_backward.py --quick    # a subset, in seconds
    python benchmarks/bench_backward.py --csv out.csv --threads 1
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
from torch import nn

from _timing import best_of_rounds, cpu_name, environment, load_average
from meprop import MePropConfig, SparseLinear
from meprop.ops import _kernel_module, select_columns

# (batch, in, out, ks)
FULL = [
    (1, 500, 500, (10, 20, 80)),
    (10, 500, 500, (10, 20, 80)),
    (100, 500, 500, (10, 20, 80)),
    (100, 784, 500, (80,)),
    (32, 4096, 4096, (32, 64)),
    (256, 4096, 4096, (32, 64)),
]
QUICK = [(10, 500, 500, (20,)), (100, 500, 500, (20,)), (32, 4096, 4096, (32,))]
VARIANTS = [  # (label, mode, sparse_grad)
    ("per_example", "per_example", False),
    ("per_example+sparse_grad", "per_example", True),
    ("unified", "unified", False),
    ("unified+sparse_grad", "unified", True),
]


def machine_line(backend: str) -> str:
    kern = _kernel_module(backend, torch.zeros(1))
    name = "torch ops" if kern is None else kern.__name__.rsplit(".", 1)[-1]
    name = {"native": "C++ (meprop.kernels.native)", "cpu": "numba"}.get(name, name)
    return (
        f"# {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; kernels: {name}; backend {backend}; "
        f"load average {load_average()}"
    )


def backward_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """One backward through ``layer`` (forward done once, graph retained), grads set to None."""
    y = layer(x)
    params = [x, *layer.parameters()]

    def step():
        for p in params:
            p.grad = None
        y.backward(g, retain_graph=True)

    step()  # warm-up (builds or compiles the kernels on first use)
    step()
    return step


def selection_fns(batch: int, d_out: int, k: int, backend: str) -> dict:
    """The selection alone, as the backward runs it (kernels where they apply)."""
    g = torch.randn(batch, d_out)
    kern = _kernel_module(backend, g)
    per = (lambda: kern.topk_rows(g, k)) if kern else (lambda: g.abs().topk(k, dim=1))
    uni = (
        (lambda: kern.top_columns(g, k))
        if hasattr(kern, "top_columns")
        else (lambda: select_columns(g, k))
    )
    return {"per_example": per, "unified": uni}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each keeps its fastest")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "native", "numba"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line(args.backend))
    print(environment())
    header = ["batch", "in", "out", "k", "variant", "dense_ms", "meprop_ms", "ratio", "ideal"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows, selections = [], []
    for batch, d_in, d_out, ks in QUICK if args.quick else FULL:
        dense = nn.Linear(d_in, d_out)
        x = torch.randn(batch, d_in, requires_grad=True)
        g = torch.randn(batch, d_out)
        fns = {"dense": backward_step(dense, x, g)}
        for k in ks:
            for label, mode, sparse_grad in VARIANTS:
                cfg = MePropConfig(k=k, mode=mode, sparse_grad=sparse_grad, backend=args.backend)
                layer = SparseLinear(d_in, d_out, config=cfg)
                layer.load_state_dict(dense.state_dict())
                fns[(k, label)] = backward_step(layer, x, g)
            for mode, fn in selection_fns(batch, d_out, k, args.backend).items():
                fns[(k, "select", mode)] = fn
        t = best_of_rounds(fns, args.rounds, args.min_time)
        for k in ks:
            for label, _, _ in VARIANTS:
                row = [batch, d_in, d_out, k, label, f"{1e3 * t['dense']:.3f}"]
                row += [f"{1e3 * t[(k, label)]:.3f}", f"{t['dense'] / t[(k, label)]:.1f}x"]
                row.append(f"{d_out / k:.0f}x")
                rows.append(row)
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
            for mode in ("per_example", "unified"):
                sel = t[(k, "select", mode)]
                selections.append((batch, d_in, d_out, k, mode, sel, sel / t[(k, mode)]))
    print("\nSelection alone (the top-k of each row / the column ranking), as meProp runs it:")
    print("| batch | in | out | k | mode | select_ms | share of the meProp backward |")
    print("|---|---|---|---|---|---|---|")
    for batch, d_in, d_out, k, mode, sel, share in selections:
        print(f"| {batch} | {d_in} | {d_out} | {k} | {mode} | {1e3 * sel:.4f} | {share:.0%} |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
