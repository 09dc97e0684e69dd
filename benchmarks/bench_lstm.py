"""LSTM training step: PyTorch's fused nn.LSTM vs meProp's SparseLSTM, timed side by side.

meProp's LSTM rule (Sun et al., ICML 2017): top-k of the gate pre-activation gradients at every
time step. For each shape (hidden 500, sequence length 25, as in the paper's POS tagger), two
measurements with ``torch.utils.benchmark`` (blocked_autorange, median):

* fwd+bwd: forward and backward of ``out = lstm(x)`` from a fixed output gradient;
* bwd: backward only (forward done once, graph retained).

The input requires a gradient (as word embeddings do); gradients are set to None before each
call. Prints milliseconds and ratios dense / meProp, with the machine, torch version, thread
count and load average (other processes on the machine distort timings).

    python benchmarks/bench_lstm.py            # the full table
    python benchmarks/bench_lstm.py --quick    # a subset, in seconds
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.benchmark import Timer

from _timing import cpu_name
from meprop import MePropConfig, SparseLSTM
from meprop.ops import kernel_module

HIDDEN, STEPS = 500, 25
FULL = dict(inputs=(100,), batches=(1, 32), ks=(5, 10, 20), dirs=(1, 2))
QUICK = dict(inputs=(100,), batches=(32,), ks=(10,), dirs=(1, 2))
# Settings that change the timings: numba's OpenMP workers spin after each kernel call and
# take CPU from PyTorch's next ops unless told to wait passively (OMP_WAIT_POLICY=PASSIVE) or
# numba uses another threading layer (NUMBA_THREADING_LAYER=workqueue).
ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS")


def kernel_name(backend: str) -> str:
    kern = kernel_module(backend, torch.zeros(1))
    if kern is None:
        return "torch ops"
    return {"native": "C++", "cpu": "numba"}[kern.__name__.rsplit(".", 1)[-1]]


def measure(lstm: nn.Module, x: torch.Tensor, g: torch.Tensor, min_time: float):
    """Median seconds of (forward + backward, backward only)."""
    params = [x, *lstm.parameters()]

    def clear():
        for p in params:
            p.grad = None

    def fwd_bwd():
        clear()
        lstm(x)[0].backward(g)

    out = lstm(x)[0]

    def bwd():
        clear()
        out.backward(g, retain_graph=True)

    fwd_bwd()  # warm-up: compiles the kernels on first use
    bwd()
    t_all = Timer("f()", globals={"f": fwd_bwd}).blocked_autorange(min_run_time=min_time)
    t_bwd = Timer("f()", globals={"f": bwd}).blocked_autorange(min_run_time=min_time)
    return t_all.median, t_bwd.median


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--mode", default="per_example", choices=("per_example", "unified", "random"))
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "native", "numba"))
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grid = QUICK if args.quick else FULL
    print(
        f"# {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"load average {os.getloadavg()[0]:.2f}; kernels: {kernel_name(args.backend)}; "
        f"mode {args.mode}, backend {args.backend}; "
        f"hidden {HIDDEN}, length {STEPS}, float32"
    )
    env = {v: os.environ[v] for v in ENV if v in os.environ}
    print(f"# environment: {env or 'defaults'}")
    header = [
        "in", "batch", "dirs", "k", "dense fwd+bwd ms", "meProp fwd+bwd ms", "ratio",
        "dense bwd ms", "meProp bwd ms", "ratio", "4H/k",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for d_in in grid["inputs"]:
        for batch in grid["batches"]:
            for dirs in grid["dirs"]:
                dense = nn.LSTM(d_in, HIDDEN, bidirectional=dirs == 2)
                x = torch.randn(STEPS, batch, d_in, requires_grad=True)
                g = torch.randn(STEPS, batch, dirs * HIDDEN)
                d_all, d_bwd = measure(dense, x, g, args.min_time)
                for k in grid["ks"]:
                    cfg = MePropConfig(k=k, mode=args.mode, backend=args.backend)
                    sparse = SparseLSTM(d_in, HIDDEN, bidirectional=dirs == 2, config=cfg)
                    sparse.load_state_dict(dense.state_dict())
                    s_all, s_bwd = measure(sparse, x, g, args.min_time)
                    row = [
                        d_in,
                        batch,
                        dirs,
                        k,
                        f"{1e3 * d_all:.2f}",
                        f"{1e3 * s_all:.2f}",
                        f"{d_all / s_all:.2f}x",
                        f"{1e3 * d_bwd:.2f}",
                        f"{1e3 * s_bwd:.2f}",
                        f"{d_bwd / s_bwd:.2f}x",
                        f"{4 * HIDDEN / k:.0f}x",
                    ]
                    print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
