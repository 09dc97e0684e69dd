"""The optimizer step alone, torch's implementations side by side, on the MNIST MLP's
parameters (784-500-500-10: 648,010 parameters in six tensors) with dense gradients.

For Adam, Adagrad and SGD: the default (on CPU a Python loop over the tensors), ``foreach=True``
(one call over all tensors) and ``fused=True`` (one vectorised kernel per tensor), all giving
the same update up to float rounding. ``meprop.experiments.train.make_optimizer`` takes the fastest here.

Then Adam on a row-sparse gradient (meProp's ``sparse_grad=True``: k of n rows), one weight
of each shape: torch's fused Adam on the same gradient made dense (what ``sparse_grad=False``
gives), ``meprop.LazyAdam`` (its C++ row kernel, and its PyTorch-ops fallback) and
``torch.optim.SparseAdam``. LazyAdam and SparseAdam are lazy (rows without a gradient do not
move): they are timed against the dense Adam a meProp run would otherwise use. Last, one step
over the whole MLP (hidden weights row-sparse at k of 500 rows, the rest dense), LazyAdam
against fused Adam on dense gradients: what a training step pays, per-tensor work included.

    python benchmarks/bench_optimizer.py [--threads 1] [--min-time 0.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import meprop.optim
from _timing import best_of_rounds, cpu_name, load_average
from meprop import LazyAdam

LR = {"Adam": 1e-3, "Adagrad": 1e-2, "SGD": 0.1}
IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def params() -> list[nn.Parameter]:
    torch.manual_seed(0)  # the same parameters and gradients for every implementation
    model = nn.Sequential(nn.Linear(784, 500), nn.Linear(500, 500), nn.Linear(500, 10))
    ps = list(model.parameters())
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    return ps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"load average {load_average()}"
    )
    print("| optimizer | default ms | foreach ms | fused ms | largest difference from default |")
    print("|---|---|---|---|---|")
    for name, lr in LR.items():
        steps, results = {}, {}
        for impl, kw in IMPLEMENTATIONS.items():
            ps = params()
            opt = getattr(torch.optim, name)(ps, lr=lr, **kw)
            steps[impl] = opt.step
            for _ in range(5):  # same gradients, five steps: compare the results
                opt.step()
            results[impl] = [p.detach().clone() for p in ps]
        t = best_of_rounds(steps, args.rounds, args.min_time)
        diff = max(
            (a - b).abs().max().item()
            for impl in ("foreach", "fused")
            for a, b in zip(results[impl], results["default"], strict=True)
        )
        print(
            f"| {name} | {1e3 * t['default']:.3f} | {1e3 * t['foreach']:.3f} | "
            f"{1e3 * t['fused']:.3f} | {diff:.1e} |"
        )
    row_sparse(args)
    whole_model(args)
    return 0


def whole_model(args) -> None:
    """One optimizer step over the whole MLP, as a meProp run takes it: the two hidden weights
    with k of 500 rows (row-sparse), their biases and the head dense; against fused Adam with
    every gradient dense. Counts the step's per-tensor Python work beside the kernels."""
    print()
    print("| MLP 784-500-500-10 | fused Adam, dense gradients ms | LazyAdam ms | ratio |")
    print("|---|---|---|---|")
    for k in (40, 160):
        steps = {}
        for label in ("fused", "lazy"):
            ps = params()
            for i in (0, 2):  # the hidden weights: k of their 500 rows
                pick = torch.randperm(500, generator=torch.Generator().manual_seed(i))[:k]
                rows = pick.sort().values
                ps[i].grad = torch.sparse_coo_tensor(
                    rows[None], ps[i].grad[rows], ps[i].shape, check_invariants=True
                )
                if label == "fused":
                    ps[i].grad = ps[i].grad.to_dense()
            opt = torch.optim.Adam(ps, lr=1e-3, fused=True) if label == "fused" else LazyAdam(ps)
            steps[label] = opt.step
            opt.step()  # the state, allocated once
        ms = {key: 1e3 * v for key, v in best_of_rounds(steps, args.rounds, args.min_time).items()}
        print(f"| k={k} | {ms['fused']:.3f} | {ms['lazy']:.3f} | {ms['fused'] / ms['lazy']:.2f}x |")


def row_sparse(args) -> None:
    print()
    print(
        "| weight | rows with a gradient | fused Adam, dense gradient ms | LazyAdam ms | "
        "LazyAdam, PyTorch ops ms | SparseAdam ms | fused Adam / LazyAdam |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, d in ((500, 500), (500, 784), (2000, 2000)):
        for share in (0.04, 0.08, 0.16):
            k = max(1, int(n * share))
            torch.manual_seed(0)
            rows = torch.randperm(n)[:k].sort().values
            vals = torch.randn(k, d) * 1e-2
            sparse = torch.sparse_coo_tensor(
                rows[None], vals, (n, d), is_coalesced=True, check_invariants=False
            )
            dense = sparse.to_dense()
            steps = {}
            for label, cls, kw, grad in (
                ("fused", torch.optim.Adam, {"fused": True}, dense),
                ("lazy", LazyAdam, {}, sparse),
                ("lazy_ops", LazyAdam, {}, sparse),
                ("sparse_adam", torch.optim.SparseAdam, {}, sparse),
            ):
                p = torch.nn.Parameter(torch.randn(n, d))
                p.grad = grad
                opt = cls([p], lr=1e-3, **kw)
                steps[label] = _stepper(opt, label == "lazy_ops")
                steps[label]()  # the state, allocated once
            t = best_of_rounds(steps, args.rounds, args.min_time)
            ms = {key: 1e3 * v for key, v in t.items()}
            print(
                f"| {n}x{d} | {k} ({share:.0%}) | {ms['fused']:.3f} | {ms['lazy']:.3f} | "
                f"{ms['lazy_ops']:.3f} | {ms['sparse_adam']:.3f} | "
                f"{ms['fused'] / ms['lazy']:.2f}x |"
            )


def _stepper(opt, ops_only: bool):
    """opt.step, with LazyAdam's kernel turned off for the PyTorch-ops row."""

    def step():
        if not ops_only:
            return opt.step()
        saved = meprop.optim._NATIVE[:]
        meprop.optim._NATIVE[:] = [False]
        try:
            opt.step()
        finally:
            meprop.optim._NATIVE[:] = saved

    return step


if __name__ == "__main__":
    sys.exit(main())
