"""Time meAct's active-only linear map against the dense one, side by side in one run.

For each shape (B examples, `in` inputs, n neurons) and number of active neurons per example
(a random set of that size in each row):

* forward:   dense ``F.linear(x, W, b)``            vs the active-only kernel
             (``meprop.kernels.meact_kernels.active_linear``, CSR given), and the masked dense
             reference (``torch.where(mask, F.linear(...), base)``: what the kernel avoids)
* layer:     the whole meAct training forward of an ``ActiveLinear`` (active-set selection
             from the stored float16 shares, CSR, kernel, cache read and write) vs an
             ``nn.Linear`` call
* backward:  dense ``g @ W`` + ``g.T @ x`` + ``g.sum(0)`` vs ``active_linear_dx`` +
             ``active_linear_dw`` (which read only the active entries of g)

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` in microseconds; x =
dense / meAct (above 1: meAct is faster). On a shared machine only ratios from one run compare;
on a busy one, ``--threads 1 --clock cpu`` times by the thread's CPU time instead of the wall
clock, which does not count the time the process waits for a core.

    python benchmarks/bench_meact.py                # MNIST's shapes and a wide layer
    python benchmarks/bench_meact.py --quick        # MNIST's first layer only
    python benchmarks/bench_meact.py --csv out.csv  # also write the rows as CSV
    python benchmarks/bench_meact.py --threads 1 --clock cpu  # one thread, CPU time
"""

from __future__ import annotations

import argparse
import csv
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from _timing import cpu_name
from meprop.config import MeActConfig
from meprop.kernels import meact_kernels as active
from meprop.meact import MeAct, reference_active_linear

# (B, in, n): MNIST's hidden layers (784-500-500, batch 100), and a wide layer.
SHAPES = [(100, 784, 500), (100, 500, 500), (100, 4096, 4096)]
ACTIVE = [5, 20, 50, 125, 250, 500]


CLOCK = "wall"


def us(stmt: str, mrt: float, **env) -> float:
    """Median microseconds per run of ``stmt``: wall clock (torch's Timer), or this thread's
    CPU time (``CLOCK = "cpu"``: one thread only) over blocks of at least 10 ms."""
    if CLOCK == "wall":
        return Timer(stmt, globals=env).blocked_autorange(min_run_time=mrt).median * 1e6
    code = compile(stmt, "<stmt>", "exec")
    exec(code, env)  # warm up
    number, t0 = 1, time.thread_time()
    while True:  # calibrate: runs per block of >= 10 ms
        for _ in range(number):
            exec(code, env)
        if time.thread_time() - t0 >= 0.01:
            break
        number, t0 = number * 2, time.thread_time()
    blocks, spent = [], 0.0
    while spent < mrt or len(blocks) < 5:
        t0 = time.thread_time()
        for _ in range(number):
            exec(code, env)
        dt = time.thread_time() - t0
        blocks.append(dt / number)
        spent += dt
    return sorted(blocks)[len(blocks) // 2] * 1e6


def bench(b: int, d: int, n: int, k: int, mrt: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=gen)
    w = torch.randn(n, d, generator=gen) / d**0.5
    bias = torch.randn(n, generator=gen)
    g = torch.randn(b, n, generator=gen)
    base = torch.randn(b, n, generator=gen)
    # k random active neurons per example
    cols = torch.rand(b, n, generator=gen).topk(k, dim=1).indices.sort(dim=1).values
    mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, cols, True)
    offsets = torch.arange(0, b * k + 1, k, dtype=torch.int64)
    cols = cols.reshape(-1)
    env = dict(F=F, x=x, w=w, bias=bias, g=g, base=base, mask=mask, offsets=offsets, cols=cols)
    env.update(active=active, ref=reference_active_linear)
    r = {
        "fwd_dense": us("F.linear(x, w, bias)", mrt, **env),
        "fwd_active": us("active.active_linear(x, w, bias, offsets, cols, base)", mrt, **env),
        "fwd_masked": us("ref(x, w, bias, mask, base)", mrt, **env),
        "bwd_dense": us("g @ w; g.t() @ x; g.sum(0)", mrt, **env),
        "bwd_active": us(
            "active.active_linear_dx(offsets, cols, g, w); "
            "active.active_linear_dw(offsets, cols, g, x)",
            mrt,
            **env,
        ),
    }
    # The whole ActiveLinear training forward: shares set so that exactly k pass the threshold
    # (k equal shares of 1/k, the rest 0; threshold 100/n % <= 100/k %).
    layer = nn.Linear(d, n)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(bias)
    pool = 10 * b  # examples in the state
    meact = MeAct(
        nn.Sequential(layer), MeActConfig(threshold=100.0 / n), pool, filter_fn=lambda m, s: True
    )
    st = meact._state["0"]
    st.share.copy_(mask.repeat(10, 1).half() / k)
    st.total.fill_(1.0)
    ids = torch.randperm(pool, generator=gen)[:b]

    def layer_forward():
        with meact.batch(ids), torch.no_grad():
            return layer(x)

    layer_forward()
    assert int(st.active) == b * k, "the benchmark's shares must give k active per example"
    r["layer_meact"] = us("f()", mrt, f=layer_forward)
    r["layer_dense"] = us("f(x)", mrt, f=nn.Linear(d, n), x=x)  # (with module call overhead)
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MNIST's first layer only")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--threads", type=int, help="torch (and numba) threads; default torch's")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time (1 thread)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu measures one thread: add --threads 1")
    global CLOCK
    CLOCK = args.clock

    import numba

    t0 = time.perf_counter()
    active.warmup((torch.float32,))
    print(f"torch {torch.__version__}, numba {numba.__version__}, float32")
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; clock {args.clock}")
    print(f"kernels ready in {time.perf_counter() - t0:.2f} s")
    print("times in us; x = dense / meAct (above 1: meAct is faster)\n")
    head = (
        f"{'B':>4} {'in':>5} {'n':>5} {'act':>4} | {'fwd':>8} {'active':>8} {'x':>6} "
        f"{'masked':>8} | {'layer':>8} {'meAct':>8} {'x':>6} | {'bwd':>8} {'active':>8} {'x':>6}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    for b, d, n in shapes:
        for k in [k for k in ACTIVE if k <= n] + ([n] if n not in ACTIVE else []):
            r = bench(b, d, n, k, args.min_run_time)
            rows.append(dict(B=b, inp=d, n=n, active=k, **{k2: round(v, 2) for k2, v in r.items()}))
            print(
                f"{b:>4} {d:>5} {n:>5} {k:>4} | {r['fwd_dense']:>8.1f} {r['fwd_active']:>8.1f} "
                f"{r['fwd_dense'] / r['fwd_active']:>6.2f} {r['fwd_masked']:>8.1f} | "
                f"{r['layer_dense']:>8.1f} {r['layer_meact']:>8.1f} "
                f"{r['layer_dense'] / r['layer_meact']:>6.2f} | "
                f"{r['bwd_dense']:>8.1f} {r['bwd_active']:>8.1f} "
                f"{r['bwd_dense'] / r['bwd_active']:>6.2f}",
                flush=True,
            )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nrows written to {args.csv}")


if __name__ == "__main__":
    main()
