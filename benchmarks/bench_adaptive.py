"""Backward time of adaptive k against fixed k and dense, in one run.

For each shape, a heavy-tailed output gradient (rows and columns of unlike sizes, as trained
networks' are) goes through one layer's backward: dense (nn.Linear), meProp at the bound k,
adaptive k (each rule) with that bound, and meProp at a fixed k equal to the adaptive run's
mean k (what the variable k costs against a fixed k of the same mean). Times are the 10th
percentile of calls, interleaved in rounds (benchmarks/_timing.py); ratios are dense / side.

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive.py --threads 1
"""

from __future__ import annotations

import argparse

import torch

from _timing import best_of_rounds, cpu_name, environment
from meprop import AdaptiveK
from meprop.adaptive import KRecord
from meprop.ops import sparse_linear

SHAPES = [(50, 784, 500, 80), (100, 500, 500, 80), (32, 1024, 1024, 128)]  # batch, in, out, k
RULES = {
    "tinyprop": AdaptiveK(min_k=4, rule="tinyprop"),
    "mass 0.5": AdaptiveK(min_k=4, rule="mass", share=0.5),
}


def gradient(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    rows = torch.rand(m, 1, generator=gen) + 0.1
    cols = torch.randn(1, n, generator=gen).exp()  # log-normal column sizes
    return torch.randn(m, n, generator=gen) * rows * cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}")
    print(f"# {environment()}")
    print("| batch | in -> out | bound k | side | mean k | K (max) | ms | dense / side |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for m, d, n, k in SHAPES:
        for side, t, mean, big, ratio in _compare(m, d, n, k, gen, args):
            print(f"| {m} | {d} -> {n} | {k} | {side} | {mean} | {big} | {t * 1e3:.3f} | {ratio:.2f}x |")  # fmt: skip


def _compare(m: int, d: int, n: int, k: int, gen: torch.Generator, args) -> list[tuple]:
    """(side, seconds, mean k, K, dense / side) for one shape."""
    x = torch.randn(m, d, generator=gen, requires_grad=True)
    w = torch.randn(n, d, generator=gen, requires_grad=True)
    g = gradient(m, n, gen)
    # TinyProp's memory: as after an early, larger error (twice this one's largest row)
    y_max = 2 * g.abs().sum(1).max().item()

    def run(kk, adapt=None, rec=None):
        def call():
            x.grad = w.grad = None
            if rec is not None:
                rec.y_max = y_max
            sparse_linear(x, w, None, kk, adapt=adapt, record=rec).backward(g)

        return call

    def dense():
        x.grad = w.grad = None
        torch.nn.functional.linear(x, w).backward(g)

    sides = {"dense": dense, f"fixed k={k}": run(k)}
    means = {}
    for name, adapt in RULES.items():
        rec = KRecord(y_max=y_max)
        run(k, adapt, rec)()
        means[f"adaptive {name}"] = (f"{rec.last_k:.1f}", str(_kmax(g, k, adapt, y_max)))
        sides[f"adaptive {name}"] = run(k, adapt, rec)
        km = max(1, round(rec.last_k))
        sides[f"fixed k={km} (= mean of {name})"] = run(km)
    times = best_of_rounds(sides, args.rounds, args.min_time)
    return [(side, t, *means.get(side, ("", "")), times["dense"] / t) for side, t in times.items()]


def _kmax(g, k, adapt, y_max):
    from meprop.adaptive import row_ks

    return row_ks(g, k, adapt, KRecord(y_max=y_max))[3]


if __name__ == "__main__":
    main()
