"""Linear-layer backward: PyTorch's dense nn.Linear vs meProp, timed side by side in one run.

For each shape, the backward of ``y = layer(x)`` with the input requiring a gradient (as in a
hidden layer) is timed with ``torch.utils.benchmark``; gradients are set to None before each
call, so both sides store their gradient rather than add it. Prints milliseconds, the ratio
dense / meProp and the ideal ratio n/k, with the machine, torch version and thread count.

    python benchmarks/bench_backward.py            # the full table
    python benchmarks/bench_backward.py --quick    # a subset, in seconds
    python benchmarks/bench_backward.py --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys

import torch
from torch import nn
from torch.utils.benchmark import Timer

from meprop import MePropConfig, SparseLinear
from meprop.ops import kernels_available

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


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, min_time: float) -> float:
    """Median seconds of one backward through ``layer`` (forward done once, graph retained)."""
    y = layer(x)
    params = [x, *layer.parameters()]

    def step():
        for p in params:
            p.grad = None
        y.backward(g, retain_graph=True)

    step()  # warm-up (compiles kernels on first use)
    return Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_time).median


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "numba"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(
        f"# {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"numba kernels: {kernels_available(torch.zeros(1))}; backend {args.backend}"
    )
    header = ["batch", "in", "out", "k", "variant", "dense_ms", "meprop_ms", "ratio", "ideal"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for batch, d_in, d_out, ks in QUICK if args.quick else FULL:
        dense = nn.Linear(d_in, d_out)
        x = torch.randn(batch, d_in, requires_grad=True)
        g = torch.randn(batch, d_out)
        t_dense = time_backward(dense, x, g, args.min_time)
        for k in ks:
            for label, mode, sparse_grad in VARIANTS:
                cfg = MePropConfig(k=k, mode=mode, sparse_grad=sparse_grad, backend=args.backend)
                layer = SparseLinear(d_in, d_out, config=cfg)
                layer.load_state_dict(dense.state_dict())
                t = time_backward(layer, x, g, args.min_time)
                row = [
                    batch,
                    d_in,
                    d_out,
                    k,
                    label,
                    f"{1e3 * t_dense:.3f}",
                    f"{1e3 * t:.3f}",
                    f"{t_dense / t:.1f}x",
                    f"{d_out / k:.0f}x",
                ]
                rows.append(row)
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
