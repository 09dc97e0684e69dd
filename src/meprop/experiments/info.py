"""``meprop info``: what the sparse backward runs on this machine, and its tuning cache.

Prints the CPU (model, ISA), the C++ kernels' build (-march, vector width, the L2 size its
blocking assumes), whether numba runs, the environment settings and every choice that
``backend="auto"`` has measured here (see ``meprop.kernels.dispatch``). ``--tune`` measures
the paper's layer shapes now, ``--clear`` forgets the choices (the next calls measure again) and the kernel builds that
failed (they are tried again).
"""

from __future__ import annotations

import argparse

import torch

# The shapes measured by --tune: (batch rows, in, out, k), the MNIST MLP's and the parser's
# hidden layers at their default batch sizes, and the paper's larger k.
TUNE_SHAPES = [(50, 784, 500, 20), (50, 500, 500, 20), (100, 500, 500, 20), (1000, 2400, 200, 20)]


def tune(shapes=TUNE_SHAPES, modes=("per_example", "unified")) -> None:
    """Run one backward of each shape and mode, so that ``auto`` measures its choices now."""
    from meprop.ops import sparse_linear

    for m, d_in, d_out, k in shapes:
        x = torch.randn(m, d_in, requires_grad=True)
        w = torch.randn(d_out, d_in, requires_grad=True)
        g = torch.randn(m, d_out)
        for mode in modes:
            sparse_linear(x, w, None, k=k, mode=mode).backward(g)


def _info(args: argparse.Namespace) -> None:
    from meprop.kernels import build, dispatch

    dispatch.pinned()  # a bad MEPROP_BACKEND or MEPROP_MARCH: one line
    build.check_march()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clear:
        dispatch.tuner().clear()
        for marker in build.forget_failures():
            print(f"forgot the failed kernel build {marker.name}: it is tried again now")
    if args.tune:
        tune()
    print(dispatch.describe())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="the CPU, the kernel builds and what backend='auto' chose here",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tune", action="store_true", help="measure the paper's layer shapes now")
    p.add_argument(
        "--clear",
        action="store_true",
        help="forget the measured choices and the failed kernel builds first",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.set_defaults(func=_info)
