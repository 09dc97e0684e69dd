"""The main job in a few minutes: the paper's MNIST MLP trained dense and with meProp.

Both runs start from the same seed (same initialisation and data order) and go through the
experiment trainer; the demo prints both test accuracies and the backward-time ratios, whole
backward and its linear-map part, measured in this one process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from .train import TrainConfig, run


def _demo(args: argparse.Namespace) -> dict:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meprop-demo-"))
    common = dict(
        epochs=args.epochs, k=args.k, mode=args.mode, seed=args.seed, train_limit=args.train_limit
    )
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
    for key, name in (("backward", "whole backward"), ("linear_backward", "linear-map backward")):
        print(
            f"{name} time ratio (dense / meProp): {d['times'][key] / m['times'][key]:.2f}x "
            f"({d['times'][key]:.1f} s / {m['times'][key]:.1f} s)"
        )
    print(f"[{torch.get_num_threads()} threads, torch {torch.__version__}; runs in {out}]")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)
