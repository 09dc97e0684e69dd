"""Training throughput of the MNIST MLP 784-500-500-10 with meProp: one process against
several (torch.distributed, gloo, DDP), on the same global batches.

Each configuration runs in fresh processes started by ``meprop.launch.spawn``: meProp (top-k
on the hidden layers, output layer dense), Adam, global batch ``--batch-size`` split between
the ranks. Rank 0 times ``--steps`` full steps (forward, backward with DDP's all-reduce,
optimizer) after ``--warmup`` untimed ones, best of ``--repeats`` timed blocks, and reports
examples per second. Images are the first MNIST training images when ``$MEPROP_DATA`` (or
``--data-dir``) holds MNIST, else random. Prints one CSV row per configuration, then the
ratios to one process with the same total number of threads.

    python benchmarks/bench_ddp.py [--k 20] [--batch-size 100] [--steps 200] [--configs 1x1,1x2,2x1]

A configuration ``PxT`` is P processes of T intra-op threads each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _timing import cpu_name
from meprop import MePropConfig, hidden_layers, sparsify_
from meprop import distributed as mdist
from meprop.launch import cpu_count, spawn


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )


def images(n: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from meprop.data import load_mnist

        train = load_mnist("mnist", root=data_dir, download=False).train
        return train.images[:n], train.labels[:n], "MNIST"
    except Exception:  # no data here: the timing does not depend on the pixels much
        gen = torch.Generator().manual_seed(0)
        return (
            torch.rand(n, 784, generator=gen),
            torch.randint(0, 10, (n,), generator=gen),
            "random",
        )


def worker(opts: dict, out: str) -> None:
    world = mdist.world_size()
    x_all, y_all, source = images(opts["examples"], opts["data_dir"])
    torch.manual_seed(0)
    model = mlp()
    if opts["k"]:
        cfg = MePropConfig(k=opts["k"], mode=opts["mode"], scope=opts["scope"])
        sparsify_(model, cfg, filter_fn=hidden_layers(model))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = mdist.wrap(model) if world > 1 else model
    bs, n = opts["batch_size"], len(y_all)

    def step(i: int) -> None:
        j = (i * bs) % (n - bs + 1)
        (x, y), share = mdist.shard((x_all[j : j + bs], y_all[j : j + bs]))
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(net(x), y) * share).backward()
        opt.step()

    for i in range(opts["warmup"]):
        step(i)
    best = float("inf")
    for r in range(opts["repeats"]):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for i in range(opts["steps"]):
            step(opts["warmup"] + r * opts["steps"] + i)
        best = min(best, time.perf_counter() - t0)
    if mdist.rank() == 0:
        result = {
            "processes": world,
            "threads_per_process": torch.get_num_threads(),
            "examples_per_s": opts["steps"] * bs / best,
            "ms_per_step": 1000 * best / opts["steps"],
            "data": source,
        }
        Path(out).write_text(json.dumps(result))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--k", type=int, default=20, help="top-k (0: dense)")
    ap.add_argument("--mode", default="per_example", choices=("per_example", "unified"))
    ap.add_argument("--scope", default="local", choices=("local", "global"))
    ap.add_argument("--batch-size", type=int, default=100, help="global batch")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=20000, help="training images cycled through")
    ap.add_argument("--configs", default="1x1,1x2,2x1", help="PxT: P processes, T threads each")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    opts = {k: getattr(args, k) for k in ("k", "mode", "scope", "batch_size", "steps", "warmup")}
    opts |= {"repeats": args.repeats, "examples": args.examples, "data_dir": args.data_dir}

    print(
        f"# {cpu_name()}, {cpu_count()} cores, torch "
        f"{torch.__version__}, MLP 784-500-500-10, meProp k={args.k} {args.mode} "
        f"(scope {args.scope}), Adam, global batch {args.batch_size}"
    )
    rows = []
    writer = csv.writer(sys.stdout)
    writer.writerow(["processes", "threads_per_process", "examples_per_s", "ms_per_step", "data"])
    for spec in args.configs.split(","):
        nproc, threads = (int(v) for v in spec.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            spawn(worker, nproc, (opts, out), threads=threads, timeout_s=600)
            row = json.loads(Path(out).read_text())
        rows.append(row)
        writer.writerow([row[k] if not isinstance(row[k], float) else f"{row[k]:.1f}" for k in row])
        sys.stdout.flush()
    by_threads: dict[int, dict] = {}
    for r in rows:
        if r["processes"] == 1:
            by_threads[r["threads_per_process"]] = r
    for r in rows:
        if r["processes"] > 1:
            total = r["processes"] * r["threads_per_process"]
            base = by_threads.get(total)
            if base is not None:
                print(
                    f"# {r['processes']} processes x {r['threads_per_process']} thread(s) vs 1 "
                    f"process x {total} threads: {r['examples_per_s'] / base['examples_per_s']:.2f}x"
                )
            if 1 in by_threads:
                print(
                    f"# {r['processes']} processes x {r['threads_per_process']} thread(s) vs 1 "
                    f"process x 1 thread: "
                    f"{r['examples_per_s'] / by_threads[1]['examples_per_s']:.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
