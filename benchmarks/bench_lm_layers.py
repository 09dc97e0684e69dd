"""Forward + backward of the LM's MLP projections, dense and meProp, at the lm task's shapes.

The lm task's batch is 32 windows of 128 bytes: 4096 rows. ``mlp.fc`` maps d_model -> the MLP
width, ``mlp.proj`` the MLP width -> d_model; with k = 1/8 of the MLP width, k is half of
``mlp.proj``'s outputs. Prints, per layer, each side's ms per call and its time over
``nn.Linear`` (timed in turn in one process: ``_timing.best_of_rounds``).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_layers.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

from _timing import best_of_rounds, cpu_name, environment
from meprop import MePropConfig, sparsify_


def _step(layer, x, g):
    def call():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096, help="batch x context (lm: 32 x 128)")
    ap.add_argument("--width", type=int, default=512, help="the MLP width")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--k", type=int, default=64, help="meProp's k (lm grid: width / 8)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}; {environment()}; torch {torch.__version__}")
    print(f"# rows {args.rows}, k {args.k}; ms per forward + backward (time / nn.Linear's)")
    torch.manual_seed(0)
    for name, n_in, n_out in (
        ("mlp.fc", args.d_model, args.width),
        ("mlp.proj", args.width, args.d_model),
    ):
        x = torch.randn(args.rows, n_in, requires_grad=True)
        g = torch.randn(args.rows, n_out)
        layers = {"dense": torch.nn.Linear(n_in, n_out)}
        for mode in ("per_example", "unified"):
            net = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
            layers[mode] = sparsify_(net, MePropConfig(k=args.k, mode=mode))

        calls = {key: _step(layer, x, g) for key, layer in layers.items()}
        for call in calls.values():  # first calls: the backend's timing, the kernels' build
            call()
        ms = {key: 1e3 * t for key, t in best_of_rounds(calls, args.rounds, args.min_time).items()}
        cells = ", ".join(f"{key} {v:.2f} ({v / ms['dense']:.2f}x)" for key, v in ms.items())
        print(f"{name} {n_in} -> {n_out} (k/n = {args.k / n_out:.2f}): {cells}")


if __name__ == "__main__":
    main()
