"""The cost of one all-reduce between processes of this machine (torch.distributed, gloo):
what a data-parallel step pays per collective, before any model.

Each size (bytes of float32) is all-reduced ``--calls`` times in a row by every rank after a
barrier; a rank's figure is the QUANTILE (10th percentile, as every benchmark here) and the
median of the per-call times (rank 0 prints them, and the load average before). The sizes
default to those of docs/distributed.md: 2 KB (the column scores a unified
``scope="global"`` layer of 500 sums in backward), 127 KB (the paper's MLP's kept rows with
the hook, unified k=20) and 2.6 MB (its whole gradient).

    python benchmarks/bench_allreduce.py [--nproc 2] [--sizes 2000,126768,2592040]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from _timing import QUANTILE, cpu_name, load_average
from meprop.experiments.launch import spawn


def work(sizes: list[int], calls: int) -> None:
    rank = dist.get_rank()
    for size in sizes:
        x = torch.ones(max(1, size // 4))
        for _ in range(10):  # connections and buffers
            dist.all_reduce(x)
        dist.barrier()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t)
        times.sort()
        if rank == 0:
            p10, med = times[int(QUANTILE * (len(times) - 1))], statistics.median(times)
            print(f"{size:>10,} bytes  p10 {1e6 * p10:9.0f} us  median {1e6 * med:9.0f} us  "
                  f"({size / med / 1e9:.2f} GB/s at the median)", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes (ranks), 1 thread each")
    ap.add_argument("--sizes", default="2000,126768,2592040", help="bytes, comma-separated")
    ap.add_argument("--calls", type=int, default=200, help="timed all-reduces per size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"{cpu_name()}; torch {torch.__version__}; gloo, {args.nproc} processes x 1 thread; "
          f"load {load_average()}")  # fmt: skip
    spawn(work, args.nproc, (sizes, args.calls), threads=1)


if __name__ == "__main__":
    main()
