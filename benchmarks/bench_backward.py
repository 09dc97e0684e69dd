"""Linear-layer backward: PyTorch's dense nn.Linear vs meProp, timed side by side in one run.

For each shape, the backward of ``y = layer(x)`` with the input requiring a gradient (as in a
hidden layer) is timed as a training step runs it: a fresh forward (untimed), then the timed
backward (``--replay``: one retained graph, replayed); gradients are set to None before each
call, so both sides store their gradient rather than add it. Times are the 10th percentile of
per-call times, dense and every meProp variant timed in turn in ``--rounds`` rounds, each
keeping its fastest round (see ``_timing.py``: robust to other processes on the machine).

Each meProp variant runs with the default ``backend="auto"`` (which times the implementations
on first use and caches its choice: see ``meprop info``) and, unless ``--no-candidates``,
with each implementation forced (native C++, numba, torch's compacted GEMMs, dense masked
GEMMs), so each row shows the ratio dense / auto, which implementation auto ran, the fastest
one and how far auto is from it. Then the selection alone (top-k of each row for per_example,
the column ranking for unified) against the whole meProp backward. The header names the CPU,
its ISA and caches, and the C++ build (-march, vector width; ``MEPROP_MARCH=x86-64-v3``
benchmarks the AVX2 build).

    python benchmarks/bench_backward.py --threads 1           # the full table
    python benchmarks/bench_backward.py --quick --threads 1   # a subset
    python benchmarks/bench_backward.py --csv out.csv --fresh # time auto's choices anew
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

from _timing import backward_timer, best_of_rounds, cpu_name, environment, load_average, timed
from meprop import MePropConfig, SparseLinear
from meprop.kernels import dispatch
from meprop.ops import candidates, kernel_module, select_columns

# (batch, in, out, ks)
FULL = [
    (1, 500, 500, (10, 20, 80)),
    (10, 500, 500, (10, 20, 80)),
    (100, 500, 500, (10, 20, 80)),
    (50, 784, 500, (20, 80)),
    (100, 784, 500, (80,)),
    (1024, 1024, 256, (32,)),  # transformer-MLP-sized: many rows, narrow output
    (32, 4096, 4096, (32, 64)),
    (256, 4096, 4096, (32, 64)),
]
QUICK = [
    (10, 500, 500, (20,)),
    (100, 500, 500, (20,)),
    (50, 784, 500, (80,)),
    (1024, 1024, 256, (32,)),
    (32, 4096, 4096, (32,)),
]
VARIANTS = [  # (label, mode, sparse_grad)
    ("per_example", "per_example", False),
    ("per_example+sparse_grad", "per_example", True),
    ("unified", "unified", False),
    ("unified+sparse_grad", "unified", True),
]


def machine_lines() -> list[str]:
    """The machine (CPU, ISA, caches, C++ build), torch, threads, numba and the load."""
    from meprop.kernels import cpu

    return [
        f"# {cpu_name()}; {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads",
        f"# numba {'yes' if cpu.available() else 'no'}; load average {load_average()}",
    ]


def selection_fns(batch: int, d_out: int, k: int) -> dict:
    """The selection alone, as the fastest kernels here run it."""
    g = torch.randn(batch, d_out)
    kern = kernel_module("auto", g)
    per = (lambda: kern.topk_rows(g, k)) if kern else (lambda: g.abs().topk(k, dim=1))
    uni = (
        (lambda: kern.top_columns(g, k))
        if hasattr(kern, "top_columns")
        else (lambda: select_columns(g, k))
    )
    return {"per_example": timed(per), "unified": timed(uni)}


def auto_choice(mode, batch, d_in, d_out, k, sparse_grad) -> str:
    """What backend='auto' ran for this layer (after its first backward)."""
    if not dispatch.tuning_enabled() or dispatch.pinned():
        return "untimed"
    needs = "xw" + ("s" if sparse_grad else "")
    cls = dispatch.shape_class(mode, torch.float32, batch, d_out, d_in, k, needs)
    entry = dispatch.tuner().choices().get(cls)
    return entry["backend"] if entry else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each keeps its fastest")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument(
        "--no-candidates", action="store_true", help="time auto only, not each implementation"
    )
    ap.add_argument(
        "--fresh", action="store_true", help="auto times its choices anew (a temporary cache)"
    )
    ap.add_argument(
        "--replay",
        action="store_true",
        help="replay one retained graph (default: a fresh forward, untimed, before each backward)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh:
        dispatch._TUNER = dispatch.Tuner(Path(tempfile.mkdtemp()) / "dispatch.json")
    torch.manual_seed(0)
    print("\n".join(machine_lines()))
    print(environment())
    how = "one retained graph replayed" if args.replay else "a fresh forward (untimed) before each"
    print(f"# backward timed after {how}")
    header = ["batch", "in", "out", "k", "variant", "dense_ms", "auto_ms", "dense/auto"]
    header += ["auto ran", "fastest", "fastest_ms", "auto/fastest", "n/k"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows, selections = [], []
    for batch, d_in, d_out, ks in QUICK if args.quick else FULL:
        dense = nn.Linear(d_in, d_out)
        x = torch.randn(batch, d_in, requires_grad=True)
        g = torch.randn(batch, d_out)
        fresh = not args.replay
        fns = {"dense": backward_timer(dense, x, g, fresh)}
        for k in ks:
            for label, mode, sparse_grad in VARIANTS:
                names = ["auto"] + ([] if args.no_candidates else candidates(g, mode))
                if mode == "unified":  # (numba has no unified kernels: it runs torch's)
                    names = [b for b in names if b != "numba"]
                for backend in names:
                    cfg = MePropConfig(k=k, mode=mode, sparse_grad=sparse_grad, backend=backend)
                    layer = SparseLinear(d_in, d_out, config=cfg)
                    layer.load_state_dict(dense.state_dict())
                    fns[(k, label, backend)] = backward_timer(layer, x, g, fresh)
            for mode, fn in selection_fns(batch, d_out, k).items():
                fns[(k, "select", mode)] = fn
        t = best_of_rounds(fns, args.rounds, args.min_time, self_timed=True)
        for k in ks:
            for label, mode, sparse_grad in VARIANTS:
                mine = {key[2]: v for key, v in t.items() if key[:2] == (k, label)}
                auto = mine.pop("auto")
                forced = mine or {"auto": auto}
                fastest = min(forced, key=forced.get)
                ran = auto_choice(mode, batch, d_in, d_out, k, sparse_grad)
                row = [batch, d_in, d_out, k, label, f"{1e3 * t['dense']:.3f}"]
                row += [f"{1e3 * auto:.3f}", f"{t['dense'] / auto:.1f}x", ran, fastest]
                row += [f"{1e3 * forced[fastest]:.3f}", f"{auto / forced[fastest]:.2f}"]
                row.append(f"{d_out / k:.0f}x")
                rows.append(row)
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
            for mode in ("per_example", "unified"):
                sel = t[(k, "select", mode)]
                selections.append((batch, d_in, d_out, k, mode, sel, sel / t[(k, mode, "auto")]))
    print("\nSelection alone (the top-k of each row / the column ranking), as meProp runs it:")
    print("| batch | in | out | k | mode | select_ms | share of the meProp backward (auto) |")
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
