"""The main job in a few minutes: the paper's MNIST MLP trained dense and with meProp.

Both runs start from the same seed (same initialisation and data order) and go through the
experiment trainer; the demo prints the machine (CPU model, SIMD level, caches, threads), both
test accuracies and the time ratios measured in this one process: whole backward, its
linear-map part, the hidden layers' backward (what meProp sparsifies) and the training step
(forward, backward, optimizer). Where meProp's backward was not faster, it says what ran and
what may explain it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from . import machine
from .train import TrainConfig, run

STEP = ("forward", "backward", "optimizer")  # the training step's phases in the trainer's log


def backend_lines(mode: str, k: int = 20, batch: int = 50) -> list[str]:
    """What runs meProp's backward here with ``backend="auto"``: the kernel builds and the
    implementations chosen for the demo's two hidden layers (784 -> 500 without an input
    gradient, 500 -> 500 with one) at this thread count (from ``meprop.kernels.dispatch``,
    which times them on first use; ``meprop info`` lists every choice)."""
    try:
        from .kernels import dispatch

        lines = dispatch.describe().splitlines()
        choices = dispatch.tuner().choices()
    except Exception:  # noqa: BLE001 - a description must never stop the demo
        from . import ops

        kern = ops.kernel_module("auto", torch.zeros(1))
        name = "PyTorch ops" if kern is None else kern.__name__.rsplit(".", 1)[-1]
        return [f"kernels: {name}"]
    head = [x for x in lines[1:] if not x.startswith(" ")]
    out = []
    for d_in, needs in ((784, "w"), (500, "xw")):
        cls = dispatch.shape_class(mode, torch.float32, batch, 500, d_in, k, needs)
        entry = choices.get(cls)
        if entry is not None:
            us = ", ".join(f"{n} {v:g} us" for n, v in sorted(entry.get("us", {}).items()))
            out.append(f"{d_in} -> 500: {entry['backend']}  ({us})")
        else:
            out.append(
                f"{d_in} -> 500: untimed (the default order: {dispatch.pinned() or 'native first'})"
            )
    return head + out


def ratio_lines(dense: dict, meprop: dict) -> list[str]:
    """``name time ratio (dense / meProp): R x (D s / M s)`` for each timed part both runs
    logged."""
    d, m = dict(dense), dict(meprop)
    d["step"], m["step"] = sum(d.get(k, 0.0) for k in STEP), sum(m.get(k, 0.0) for k in STEP)
    lines = []
    for key, name in (
        ("backward", "whole backward"),
        ("linear_backward", "linear-map backward"),
        ("hidden_backward", "hidden layers' backward"),
        ("step", "training step (forward, backward, optimizer)"),
    ):
        if d.get(key) and m.get(key):
            lines.append(
                f"{name} time ratio (dense / meProp): {d[key] / m[key]:.2f}x "
                f"({d[key]:.1f} s / {m[key]:.1f} s)"
            )
    return lines


def why_not_faster(dense: dict, meprop: dict, isa: str) -> str | None:
    """A line on the circumstances where meProp's backward was not faster than dense, else
    None."""
    if meprop["backward"] < dense["backward"]:
        return None
    load = "/".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"meProp's backward was not faster here: CPU SIMD level {isa}, "
        f"{torch.get_num_threads()} threads, load average {load} (other processes skew the "
        "two runs' times); the implementations it ran are listed above; "
        "`python benchmarks/bench_backward.py --threads 1` times the layers side by side, "
        "`python benchmarks/bench_kernels.py` each kernel"
    )


def _demo(args: argparse.Namespace) -> dict:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meprop-demo-"))
    common = dict(
        epochs=args.epochs, k=args.k, mode=args.mode, seed=args.seed, train_limit=args.train_limit
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = machine.cpu_summary()
    print(f"machine: {machine.summary_line(summary)}")
    summaries = {}
    for method in ("dense", "meprop"):
        print(f"== {method} ==")
        summaries[method] = run(
            TrainConfig(method=method, **common),
            out / method,
            data_dir=args.data_dir,
            progress=not args.no_progress,
        )
    d, m = summaries["dense"], summaries["meprop"]
    print()
    print(f"dense  test accuracy {100 * d['test_accuracy']:.2f}%")
    print(f"meProp test accuracy {100 * m['test_accuracy']:.2f}%  (k={args.k} of 500, {args.mode})")
    for line in ratio_lines(d["times"], m["times"]):
        print(line)
    print("meProp backward implementations (backend='auto'):")
    for line in backend_lines(args.mode, args.k):
        print(f"  {line}")
    why = why_not_faster(d["times"], m["times"], summary["isa"])
    if why:
        print(why)
    print(f"[{machine.summary_line(summary)}; torch {torch.__version__}; runs in {out}]")
    return summaries


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="MNIST 784-500-500-10: dense vs meProp, accuracies and backward speedup",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--k", type=int, default=20, help="top-k kept")
    p.add_argument("--mode", default="unified", choices=("per_example", "unified"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="folder for the two runs (default: a temporary folder)")
    p.add_argument("--data-dir", help="data root (default: $MEPROP_DATA, then the user cache)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: a per-core comparison, as the paper's; it also keeps the "
        "ratio honest where other processes share the cores; 0: torch's default)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)
