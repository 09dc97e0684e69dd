"""Training throughput and gradient traffic of an MLP with meProp: one process against several
(torch.distributed, gloo, DDP), dense DDP against meProp DDP with and without the compacted
all-reduce (``meprop.ddp_hook``), on the same global batches.

Each configuration ``PxT`` (P processes of T intra-op threads) runs in fresh processes started
by ``meprop.experiments.launch.spawn``. Inside them every variant is built from the same initial weights:

* ``dense``: the plain MLP (under DDP: DDP's ordinary all-reduce);
* ``meprop``: meProp on the hidden layers (output layer dense), DDP's ordinary all-reduce
  (``wrap(model, compact=False)``): what meProp DDP did before the hook;
* ``meprop+hook``: the same with ``wrap(model)``, which all-reduces only the kept rows and
  makes the gradients views of DDP's buckets (``gradient_as_bucket_view=True``);
* ``dense+view``, ``meprop+view``: ``dense`` and ``meprop`` with bucket views too, to tell the
  hook's gain from the views'.

The variants are timed in turn, ``--repeats`` rounds of ``--steps`` steps each after
``--warmup`` untimed ones, so that every variant sees the same moments of a loaded machine;
each step (forward, backward with DDP's all-reduce, the trainer's optimizer: fused Adam by default) is timed on its own and a variant's
time is the 10th percentile of its steps (see ``_timing.py``). Rank 0 reports examples/s and the
bytes of gradients each rank hands to all-reduce per step: the hook counts its own; DDP's
ordinary all-reduce sends every gradient (gloo keeps no byte counts of its own). Unified
selection with ``scope="global"`` also all-reduces n column scores per layer inside backward
(both meProp variants; counted apart). Images are the first MNIST training images when
``$MEPROP_DATA`` (or ``--data-dir``) holds MNIST, else random.

``--gbps G`` simulates a slower network, labelled as such in the output: every all-reduce of B
bytes is followed by a sleep of 2 (P - 1) / P * B * 8 / G ns, a ring all-reduce's time on a
link of G Gbit/s (latency not modelled), in the hook's thread, as a real transfer would block.

    python benchmarks/bench_ddp.py [--width 500] [--k 20] [--mode per_example] [--configs 1x1,2x1]
    python benchmarks/bench_ddp.py --width 4096 --k 64 --mode unified --scope global --configs 2x1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from _timing import QUANTILE, cpu_name
from meprop import MePropConfig, hidden_layers, sparsify_
from meprop import distributed as mdist
from meprop.ddp_hook import CompactState, compact_allreduce_hook
from meprop.experiments.launch import cpu_count, spawn
from meprop.experiments.train import make_optimizer

# name -> (meProp layers, the hook, DDP's gradient_as_bucket_view)
VARIANTS = {
    "dense": (False, False, False),
    "dense+view": (False, False, True),
    "meprop": (True, False, False),
    "meprop+view": (True, False, True),
    "meprop+hook": (True, True, True),
}


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def images(n: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from meprop.experiments.data import load_mnist

        train = load_mnist("mnist", root=data_dir, download=False).train
        return train.images[:n], train.labels[:n], "MNIST"
    except Exception:  # no data here: the timing does not depend on the pixels much
        gen = torch.Generator().manual_seed(0)
        return (
            torch.rand(n, 784, generator=gen),
            torch.randint(0, 10, (n,), generator=gen),
            "random",
        )


def simulated_link(hook, state, gbps: float, world: int, bytes_of):
    """A DDP communication hook that runs ``hook`` and then sleeps as long as a ring
    all-reduce of the bytes it sent would take on a link of ``gbps`` Gbit/s (``--gbps``)."""

    def simulated_link_hook(_, bucket):  # (no annotation: this file's are strings, DDP checks)
        before = bytes_of(state, bucket, None)
        fut = hook(state, bucket)
        sent = bytes_of(state, bucket, before)
        time.sleep(2 * (world - 1) / world * sent * 8 / (gbps * 1e9))
        return fut

    return simulated_link_hook


def _hook_bytes(state, bucket, before):
    return state.bytes_sent if before is None else state.bytes_sent - before


def _plain_bytes(state, bucket, before):
    return bucket.buffer().numel() * bucket.buffer().element_size()


def build(variant: str, opts: dict, world: int):
    """(model, wrapper, optimizer, CompactState or None) of a variant, from seed 0."""
    meprop, hook, view = VARIANTS[variant]
    torch.manual_seed(0)
    model = mlp(opts["width"])
    if meprop:
        cfg = MePropConfig(k=opts["k"], mode=opts["mode"], scope=opts["scope"])
        sparsify_(model, cfg, filter_fn=hidden_layers(model))
    # the trainer's: fused Adam (the default, one step per element, is 2-10x slower here)
    opt = make_optimizer(opts["optimizer"], model.parameters(), lr=1e-3)
    if world == 1:
        return model, model, opt, None
    if not opts["gbps"]:
        compact = (opts["compact"] or True) if hook else False  # (CompactState's options)
        net = mdist.wrap(model, compact=compact, gradient_as_bucket_view=view)
        return model, net, opt, net.compact_state
    # the simulated link wraps the hook
    net = mdist.wrap(model, compact=False, gradient_as_bucket_view=view)
    state = CompactState(model, **opts["compact"]) if hook else None
    inner = compact_allreduce_hook if hook else default_hooks.allreduce_hook
    bytes_of = _hook_bytes if hook else _plain_bytes
    net.register_comm_hook(None, simulated_link(inner, state, opts["gbps"], world, bytes_of))
    return model, net, opt, state


def worker(opts: dict, out: str) -> None:
    world = mdist.world_size()
    x_all, y_all, source = images(opts["examples"], opts["data_dir"])
    variants = [v for v in opts["variants"] if world > 1 or v in ("dense", "meprop")]
    built = {v: build(v, opts, world) for v in variants}
    bs, n = opts["batch_size"], len(y_all)
    counter = [0]

    def step(v: str) -> float:
        model, net, opt, _ = built[v]
        j = (counter[0] * bs) % (n - bs + 1)
        counter[0] += 1
        t0 = time.perf_counter()
        (x, y), share = mdist.shard((x_all[j : j + bs], y_all[j : j + bs]))
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(net(x), y) * share).backward()
        opt.step()
        return time.perf_counter() - t0

    for v in variants:
        for _ in range(opts["warmup"]):
            step(v)
        if built[v][3] is not None:
            built[v][3].reset_counts()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(opts["repeats"]):
        for v in variants:
            if world > 1:
                dist.barrier()
            times[v] += [step(v) for _ in range(opts["steps"])]
    if mdist.rank() != 0:
        return
    rows = []
    for v in variants:
        model, _, _, state = built[v]
        ts = sorted(times[v])
        t = ts[int(QUANTILE * (len(ts) - 1))]
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        steps = len(ts)
        sent = state.bytes_sent / steps if state is not None else dense_bytes
        scores = 0
        if VARIANTS[v][0] and opts["mode"] == "unified" and opts["scope"] == "global":
            scores = 4 * 2 * opts["width"]  # (n,) float32 scores of both hidden layers
        rows.append(
            {
                "variant": v,
                "processes": world,
                "threads_per_process": torch.get_num_threads(),
                "examples_per_s": bs / t,
                "median_examples_per_s": bs / statistics.median(ts),
                "ms_per_step": 1000 * t,
                "grad_bytes_per_step": int(sent) if world > 1 else 0,
                "dense_grad_bytes": dense_bytes if world > 1 else 0,
                "score_bytes_per_step": scores if world > 1 else 0,
                "data": source,
            }
        )
    Path(out).write_text(json.dumps(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=500, help="hidden width (paper: 500)")
    ap.add_argument("--k", type=int, default=20, help="top-k")
    ap.add_argument("--mode", default="per_example", choices=("per_example", "unified"))
    ap.add_argument("--scope", default="local", choices=("local", "global"))
    ap.add_argument("--batch-size", type=int, default=100, help="global batch")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the variants")
    ap.add_argument("--examples", type=int, default=20000, help="training images cycled through")
    ap.add_argument("--configs", default="1x1,2x1", help="PxT: P processes, T threads each")
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="a comma-separated subset")
    ap.add_argument("--gbps", type=float, default=0.0, help="SIMULATED link speed (0: none)")
    ap.add_argument(
        "--min-union-bytes", type=int, default=None,
        help="the hook's CompactState.min_union_bytes (default: its own): pack the union of "
        "the ranks' rows from this weight size",
    )  # fmt: skip
    ap.add_argument("--dense-fraction", type=float, default=None,
                    help="the hook's CompactState.dense_fraction (default: its own)")  # fmt: skip
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    keys = ("width", "k", "mode", "scope", "batch_size", "steps", "warmup", "repeats")
    opts = {k: getattr(args, k) for k in keys}
    opts |= {"examples": args.examples, "data_dir": args.data_dir, "gbps": args.gbps}
    opts |= {"optimizer": args.optimizer, "variants": args.variants.split(",")}
    compact = {"min_union_bytes": args.min_union_bytes, "dense_fraction": args.dense_fraction}
    opts["compact"] = {k: v for k, v in compact.items() if v is not None}
    unknown = set(opts["variants"]) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")

    print(
        f"# {cpu_name()}, {cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch "
        f"{torch.__version__}, MLP 784-{args.width}-{args.width}-10, meProp k={args.k} "
        f"{args.mode} (scope {args.scope}), {args.optimizer}, global batch {args.batch_size}, gloo"
        + (f", SIMULATED link {args.gbps:g} Gbit/s (sleep per all-reduce)" if args.gbps else "")
        + "".join(f", hook {k}={v}" for k, v in opts["compact"].items())
    )
    writer = csv.writer(sys.stdout)
    fields = None
    results = {}
    for spec in args.configs.split(","):
        nproc, threads = (int(v) for v in spec.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            spawn(worker, nproc, (opts, out), threads=threads, timeout_s=600)
            rows = json.loads(Path(out).read_text())
        for r in rows:
            if fields is None:
                fields = list(r)
                writer.writerow(fields)
            writer.writerow([f"{r[k]:.1f}" if isinstance(r[k], float) else r[k] for k in fields])
            results[(nproc, threads, r["variant"])] = r
        sys.stdout.flush()
    print(f"# load after: {os.getloadavg()[0]:.1f}")
    for (p, t, v), r in results.items():
        eps = r["examples_per_s"]
        if p > 1 and v == "meprop+hook":
            sent, dense = r["grad_bytes_per_step"], r["dense_grad_bytes"]
            print(
                f"# {p}x{t} meprop+hook: {sent:,} of {dense:,} gradient bytes ({sent / dense:.3f})"
            )
            for other in ("dense", "dense+view", "meprop", "meprop+view"):
                base = results.get((p, t, other))
                if base is not None:
                    ratio = eps / base["examples_per_s"]
                    print(f"# {p}x{t} meprop+hook vs {other} DDP: {ratio:.2f}x")
        one = results.get((1, 1, v))
        if p > 1 and one is not None:
            print(f"# {p}x{t} {v} vs 1x1 {v}: {eps / one['examples_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
