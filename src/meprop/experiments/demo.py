"""The main job in a few minutes: the paper's MNIST MLP trained dense and with meProp.

Both runs start from the same seed (same initialisation and data order) and go through the
experiment trainer, one epoch of each in turn (``meprop.experiments.tta.run_interleaved``: a change in
the machine's load falls on both). The demo prints the machine (CPU model, SIMD level, caches,
threads), both test accuracies, the training time each took to reach dense's best dev accuracy
minus 0.5 and 0.2 point (the story a user needs: whether meProp gets there sooner), and the
time ratios of the parts of a step measured in this one process: whole backward, its
linear-map part, the hidden layers' backward (what meProp sparsifies) and the training step
(forward, backward, optimizer). Where meProp's backward was not faster, it says what ran and
what may explain it. Its report and plot (dev accuracy against seconds) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from meprop import machine

from .train import TrainConfig

STEP = ("forward", "backward", "optimizer")  # the training step's phases in the trainer's log


def backend_lines(mode: str, k: int = 20, batch: int = 50) -> list[str]:
    """What runs meProp's backward here with ``backend="auto"``: the kernel builds and the
    implementations chosen for the demo's two hidden layers (784 -> 500 without an input
    gradient, 500 -> 500 with one) at this thread count (from ``meprop.kernels.dispatch``,
    which times them on first use; ``meprop info`` lists every choice)."""
    try:
        from meprop.kernels import dispatch

        lines = dispatch.describe().splitlines()
        choices = dispatch.tuner().choices()
    except Exception:  # noqa: BLE001 - a description must never stop the demo
        from meprop import ops

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
    from dataclasses import replace

    from .grids import Row
    from .tasks import get_task
    from .tta import build_tta_report, read_log, run_interleaved
    from .tta_rows import EVALS_PER_EPOCH

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meprop-demo-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = machine.cpu_summary()
    print(f"machine: {machine.summary_line(summary)}")
    base = TrainConfig(method="dense", epochs=args.epochs, seed=args.seed,
                       train_limit=args.train_limit)  # fmt: skip
    steps = get_task(base, args.data_dir).steps_per_epoch(base.batch_size)
    base = replace(base, eval_every=max(1, steps // EVALS_PER_EPOCH))
    recipe = demo_recipe(args)
    label = recipe_label(recipe)
    rows = [
        Row("dense", "demo", "dense", base),
        Row("meprop", "demo", label, replace(base, method="meprop", **recipe)),
    ]
    print(f"dense and {label}, one epoch of each in turn, dev accuracy {EVALS_PER_EPOCH} "
          "times per epoch:")  # fmt: skip
    run_interleaved(rows, out, data_dir=args.data_dir, echo=lambda s: print("  " + s),
                    progress=not args.no_progress)  # fmt: skip
    runs = {r.name: out / "runs" / r.name for r in rows}
    summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in runs.items()}
    logs = {n: read_log(d / "log.jsonl") for n, d in runs.items()}
    d, m = summaries["dense"], summaries["meprop"]
    print()
    print(f"dense  test accuracy {100 * d['test_accuracy']:.2f}%")
    print(f"meProp test accuracy {100 * m['test_accuracy']:.2f}%  ({label}, of 500 units)")
    print("time to dense's accuracy (training seconds, evaluation excluded; a target counts "
          "where the mean of 3 consecutive evaluations reaches it):")  # fmt: skip
    for line in target_lines(logs["dense"], logs["meprop"]):
        print(f"  {line}")
    for line in ratio_lines(d["times"], m["times"]):
        print(line)
    print("meProp backward implementations (backend='auto'):")
    for line in backend_lines(recipe["mode"], recipe["k"]):
        print(f"  {line}")
    why = why_not_faster(d["times"], m["times"], summary["isa"])
    if why:
        print(why)
    report = build_tta_report([out], out)
    plot = out / "demo.png"
    shown = f"; dev accuracy against seconds: {plot}" if plot.exists() else ""
    print(f"[{machine.summary_line(summary)}; torch {torch.__version__}; runs and report in "
          f"{report.parent}{shown}]")  # fmt: skip
    return summaries


def demo_recipe(args: argparse.Namespace) -> dict:
    """meProp's settings in the demo: the mnist task's measured recipe
    (``tasks.RECIPES["mnist"]``: the soonest to dense's accuracy in the time-to-accuracy grid)
    unless ``--k``, ``--mode`` or ``--memory`` is given; then those (k=20 per_example without
    memory where left out: the paper's), with Adam."""
    from .tasks import RECIPES

    if args.k is None and args.mode is None and args.memory is None:
        return dict(RECIPES["mnist"])
    return {"k": args.k or 20, "mode": args.mode or "per_example", "memory": args.memory or 0.0}


def recipe_label(recipe: dict) -> str:
    """``meProp unified k=160, LazyAdam`` and the like."""
    label = f"meProp {recipe['mode']} k={recipe['k']}"
    if recipe.get("memory"):
        label += f", memory {recipe['memory']:g}"
    if recipe.get("optimizer") == "lazy_adam":
        label += ", LazyAdam"
    return label


def target_lines(dense_log: list[dict], log: list[dict]) -> list[str]:
    """``dense's best - M point (T%): dense S s (step N), meProp S s (step N): R x`` for the
    margins 0.5 and 0.2 point."""
    from .tta import time_to_targets

    def at(hit):
        return "not within these epochs" if hit is None else f"{hit[1]:.1f} s (step {hit[0]})"

    lines = []
    for margin, (target, d, m, ratio) in zip(
        (0.5, 0.2), time_to_targets(dense_log, log, "dev_accuracy", (0.5, 0.2)), strict=True
    ):
        r = f": {ratio:.2f}x dense's time" if ratio is not None else ""
        lines.append(
            f"dense's best - {margin:g} point ({100 * target:.2f}%): dense {at(d)}, "
            f"meProp {at(m)}{r}"
        )
    return lines


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="MNIST 784-500-500-10: dense vs meProp, accuracies and backward speedup",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--k", type=int, default=None,
        help="top-k kept (default: the measured recipe, unified k=160 with LazyAdam; any of "
        "--k, --mode, --memory: those, else k=20 per_example without memory, with Adam)",
    )  # fmt: skip
    p.add_argument("--mode", default=None, choices=("per_example", "unified"))
    p.add_argument(
        "--memory", type=float, default=None,
        help="memorized sparse back-propagation's ratio (0: off; docs/time_to_accuracy.md)",
    )  # fmt: skip
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
