"""Timing shared by the benchmark scripts: robust to other processes on the machine.

Each callable is run repeatedly for ``min_time`` seconds, each call timed on its own, and its
time is a low percentile (the 10th) of those calls: the cost of a call that other processes
did not interrupt. Medians of blocks of calls (``torch.utils.benchmark``'s blocked_autorange)
swing by 3x on a loaded machine, where most blocks include a preemption. The callables of one
comparison are timed in turn, in ``rounds`` rounds, and each keeps its fastest round, so all
sides of a ratio see the same moments of the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable

QUANTILE = 0.1


def call_time(
    fn: Callable[[], object], min_time: float, min_calls: int = 5, self_timed: bool = False
) -> float:
    """Seconds of one call of ``fn``: the QUANTILE of per-call times over ``min_time``.
    ``self_timed``: ``fn`` returns the seconds of its timed part (a backward after an untimed
    forward), which count instead of the whole call's."""
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(times) < min_calls or clock() - start < min_time:
        t0 = clock()
        part = fn()
        times.append(part if self_timed else clock() - t0)
    times.sort()
    return times[int(QUANTILE * (len(times) - 1))]


def backward_timer(layer, x, g, fresh: bool = True) -> Callable[[], float]:
    """One backward through ``layer`` as a training step runs it, for ``self_timed`` timing: a
    callable that sets the gradients to None, runs a fresh forward (untimed), then the timed
    ``backward(g)``, and returns its seconds. ``fresh=False``: one forward's graph, retained
    and replayed, which flatters a backward whose reads stay cached between calls (the same
    selection every call; docs/kernels.md). Warmed up twice (kernel builds, auto's timing)."""
    y = layer(x)
    params = [x, *layer.parameters()]
    clock = time.perf_counter

    def step() -> float:
        for p in params:
            p.grad = None
        out = layer(x) if fresh else y
        t0 = clock()
        out.backward(g, retain_graph=not fresh)
        return clock() - t0

    step()
    step()
    return step


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` returning its own seconds, to time beside ``backward_timer``'s steps."""
    clock = time.perf_counter

    def call() -> float:
        t0 = clock()
        fn()
        return clock() - t0

    return call


def best_of_rounds(
    fns: dict[Hashable, Callable[[], object]],
    rounds: int,
    min_time: float,
    self_timed: bool = False,
) -> dict[Hashable, float]:
    """``call_time`` of each callable, all timed in turn each round; each keeps its fastest."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for key, fn in fns.items():
            best[key] = min(best[key], call_time(fn, min_time, self_timed=self_timed))
    return best


def cpu_name() -> str:
    """The machine as every benchmark header names it: CPU model, ISA, L2 and L3 sizes, and
    the C++ kernels' build (-march, vector width), e.g. ``AMD EPYC; AVX-512; L2 1 MiB, L3 32
    MiB; kernels -march=native, 64-byte vectors``."""
    from meprop import machine
    from meprop.kernels import native

    s = machine.cpu_summary()
    caches = ", ".join(
        f"{name} {machine._size(s[key])}"
        for name, key in (("L2", "l2_bytes"), ("L3", "l3_bytes"))
        if s.get(key)
    )
    info = native.build_info() if native.available() else {}
    build = (
        f"kernels -march={info['march']}, {info['vector_bytes']}-byte vectors"
        if info
        else "no C++ kernels"
    )
    return "; ".join(part for part in (s["model"], s["isa"], caches, build) if part)


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "?"
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


# Settings that change these timings: threads, OpenMP waiting, numba's threading layer, and
# glibc malloc's thresholds (by default, freed blocks of a few MB go back to the kernel and
# come back as page faults: ~1000 faults per dense MLP training step here, ~3 ms of CPU).
ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "NUMBA_THREADING_LAYER",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MEPROP_NATIVE",
    "MEPROP_GRAD_POOL",
)


def environment() -> str:
    env = {v: os.environ[v] for v in ENV if v in os.environ}
    return f"# environment: {env or 'defaults'}"


def conv_forced(step: Callable[[], object], impl: str) -> Callable[[], object]:
    """``step`` with every SparseConv2d backward that selects channel lists (unified, per
    example) on implementation ``impl`` of ``meprop.conv.IMPLEMENTATIONS`` while it runs
    (``direct``: where it serves, else the layer's own choice); the linear layers' dispatch is
    untouched. Returns what ``step`` returns."""
    from meprop import conv

    def call():
        real = conv._pick

        def pick(cfg, sel, args):
            g, x, weight, _, geo = args[:5]
            if sel.kind not in ("cols", "rows"):
                return real(cfg, sel, args)
            if impl == "direct" and not conv._direct_serves(sel, g, x, weight, geo):
                return real(cfg, sel, args)
            return impl

        conv._pick = pick
        try:
            return step()
        finally:
            conv._pick = real

    return call
