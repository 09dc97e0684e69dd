"""Conv2d backward: PyTorch's dense nn.Conv2d vs SparseConv2d's modes, timed side by side in one
run.

Each call is one training step's backward: a fresh forward (not timed), then the timed
``y.backward(g)``, gradients set to None first, so every side stores its gradients. Times are
the 10th percentile of per-call times; dense and every meProp variant are timed in turn in
``--rounds`` rounds, each keeping its fastest round (robust to other processes on the machine,
as ``_timing.py`` explains). The first layer of a network (LeNet's conv1) gets no input
gradient, as in training on images.

Each mode (unified, per_example, random) runs with ``backend="auto"`` (what a layer runs by
default: the fastest implementation for the shape, timed on first use and cached; the "auto
ran" column names it) and with each implementation forced: ``torch`` (the backward on the
kept channels compacted: "compact") and ``masked`` (the masked g through the full backward:
"masked"), and with the C++ kernel on the kept channels ("direct", where ``auto`` would
time it). ``auto`` also has ``torch-cl``, the compacted backward with dx on channels_last
tensors. ``per_position`` (k channels at each output position) has nothing to compact: its
backward is always the masked one, with the selection by the C++ kernel (auto) or by
torch.topk over the channels (masked). All give the same gradients. The header names the CPU
and the malloc settings, which move these timings (docs/results/speed/conv.md).

    python benchmarks/bench_conv.py                  # threads 1 and all, the machine's cache
    python benchmarks/bench_conv.py --threads 1 --fresh --csv conv.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from _timing import (
    backward_timer,
    best_of_rounds,
    conv_forced,
    cpu_name,
    environment,
    load_average,
)
from meprop import MePropConfig, SparseConv2d
from meprop.kernels import dispatch, native

# (name, batch, in, out, kernel, size, padding, k, input needs a gradient)
SHAPES = [
    ("LeNet-5 conv1 (MNIST)", 50, 1, 6, 5, 28, 2, 2, False),
    ("LeNet-5 conv2 (MNIST)", 50, 6, 16, 5, 14, 0, 4, True),
    ("ResNet 3x3", 32, 64, 64, 3, 32, 1, 8, True),
    ("ResNet 3x3", 32, 128, 128, 3, 16, 1, 16, True),
    ("1x1", 32, 256, 256, 1, 16, 0, 32, True),
]
MODES = ("unified", "per_example", "random", "per_position")
BACKENDS = ("auto", "torch", "masked", "direct")


def backends(mode: str) -> tuple[str, ...]:
    """per_position has nothing to compact: its backward is the masked one, with the selection
    by the C++ kernel (auto) or by torch.topk (masked). direct: the C++ kernel on the kept
    channels, where it is built (every shape here is stride 1, dilation 1, groups 1)."""
    if mode == "per_position":
        return ("auto", "masked")
    return BACKENDS if native.available() else BACKENDS[:-1]


def auto_ran(mode: str, x: torch.Tensor, layer: nn.Module) -> str:
    """What backend='auto' ran for this layer's backward (the tuner's remembered choice)."""
    if mode == "per_position":
        return "masked, C++ selection"
    kind = "cols" if mode == "unified" else "rows"
    for sig, name in dispatch.tuner().memo.items():
        if sig[:2] == ("conv2d", kind) and sig[5] == x.shape and sig[6] == layer.weight.shape:
            return name
    return "?"


def run(threads: int, args) -> list[list]:
    torch.set_num_threads(threads)
    print(f"\n## {threads} thread{'s' if threads > 1 else ''} (load average {load_average()})\n")
    header = ["shape", "batch", "in->out", "kernel", "HxW", "k", "mode", "dense_ms"]
    header += ["auto_ms", "dense/auto", "auto ran", "compact_ms", "dense/compact"]
    header += ["masked_ms", "dense/masked", "direct_ms", "dense/direct"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for name, batch, c_in, c_out, kernel, size, pad, k, input_grad in SHAPES:
        if args.shapes and not any(t in f"{name} {c_in}->{c_out}" for t in args.shapes):
            continue
        torch.manual_seed(0)
        dense = nn.Conv2d(c_in, c_out, kernel, padding=pad)
        x = torch.randn(batch, c_in, size, size, requires_grad=input_grad)
        g = torch.randn_like(dense(x))
        steps = {"dense": backward_timer(dense, x, g)}
        layers = {}
        for mode in args.modes:
            for backend in backends(mode):
                cfg = MePropConfig(
                    k=k, mode=mode, backend="auto" if backend == "direct" else backend
                )
                layer = SparseConv2d(c_in, c_out, kernel, padding=pad, config=cfg)
                layer.load_state_dict(dense.state_dict())
                layers[(mode, backend)] = layer
                if backend == "direct":
                    steps[(mode, backend)] = conv_forced(backward_timer(layer, x, g), "direct")
                else:
                    steps[(mode, backend)] = backward_timer(layer, x, g)
        best = best_of_rounds(steps, args.rounds, args.min_time, self_timed=True)
        d = best["dense"]
        for mode in args.modes:
            a, c, m, r = (best.get((mode, b)) for b in BACKENDS)
            row = [name, batch, f"{c_in}->{c_out}", f"{kernel}x{kernel}", f"{size}x{size}", k, mode]
            row += [f"{1e3 * d:.2f}", f"{1e3 * a:.2f}", f"{d / a:.2f}x"]
            row += [auto_ran(mode, x, layers[(mode, "auto")])]
            row += ["-", "-"] if c is None else [f"{1e3 * c:.2f}", f"{d / c:.2f}x"]
            row += [f"{1e3 * m:.2f}", f"{d / m:.2f}x"]
            row += ["-", "-"] if r is None else [f"{1e3 * r:.2f}", f"{d / r:.2f}x"]
            rows.append([threads, *row])
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--threads",
        default="1,all",
        help="comma-separated torch thread counts, 'all' for every CPU (default: 1,all)",
    )
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each keeps its fastest")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument(
        "--shapes",
        type=lambda v: v.split(","),
        default=[],
        help="only the shapes whose name or 'in->out' holds one of these comma-separated texts "
        "(e.g. 'conv1,64->64')",
    )
    ap.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=list(MODES),
        help=f"comma-separated modes (default: {','.join(MODES)})",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="auto times its choices anew (a temporary cache)"
    )
    args = ap.parse_args(argv)
    if args.fresh:
        dispatch._TUNER = dispatch.Tuner(Path(tempfile.mkdtemp()) / "dispatch.json")
    counts = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    print(f"# {cpu_name()}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(environment())
    rows = []
    for threads in dict.fromkeys(counts):
        rows += run(threads, args)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["threads", "shape", "batch", "in->out", "kernel", "HxW", "k", "mode"]
                       + ["dense_ms", "auto_ms", "dense/auto", "auto ran", "compact_ms"]
                       + ["dense/compact", "masked_ms", "dense/masked", "direct_ms"]
                       + ["dense/direct"])  # fmt: skip
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
