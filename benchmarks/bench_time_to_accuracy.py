"""Time to accuracy on MNIST: wall-clock training seconds until the dev accuracy first reaches
the dense run's best minus 0.1 point, for dense, meProp (per_example, unified; each k) and
meSimp.

Every run is the library's own trainer (``meprop.experiments.train.run``) with its MNIST defaults
(784-500-500-10, Adam 1e-3, batch 50, dropout 0.1) and one seed, so all start from the same
initialisation and see the same batches. The runs share this one process and one thread; by
default they are interleaved epoch by epoch (each run resumes from its checkpoint, which gives
the same result as an uninterrupted run), so a change in the machine's load falls on all of
them alike (``--sequential`` runs each to the end in turn). Dev accuracy is measured every
``--eval-every`` steps (default: ten times per epoch), which sets how finely the crossing
time is resolved.

Read from each run's ``log.jsonl``: "train seconds" is the trainer's ``times.train``, the
wall-clock of the training loop (batches, forward, backward, optimizer, meSimp's pruning)
without evaluations and checkpoints; "time to target" is the train seconds at the first
evaluation whose dev accuracy is at least the target, "steps to target" its step. The ratio
is time to target / dense's time to target (below 1: faster than dense).

    python benchmarks/bench_time_to_accuracy.py                       # the full grid, 20 epochs
    python benchmarks/bench_time_to_accuracy.py --epochs 10 --methods dense,unified,per_example,mesimp --ks 20
    python benchmarks/bench_time_to_accuracy.py --train-limit 2000 --epochs 2   # a smoke test
    python benchmarks/bench_time_to_accuracy.py --methods dense,per_example,tinyprop --ks 40,80  # adaptive k

Prints a Markdown table; writes a PNG (dev accuracy against train seconds, one curve per run;
needs matplotlib, ``pip install -e ".[experiments]"``) and keeps the runs in ``--out``
(finished runs there are reused when their settings match).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from _timing import cpu_name, load_average
from meprop.experiments.train import TrainConfig
from meprop.experiments.tta import read_log

METHODS = ("dense", "per_example", "unified", "mesimp", "tinyprop", "mass")
MARGIN = 0.001  # 0.1 point of accuracy
STEP_PHASES = ("forward", "backward", "optimizer", "analysis", "simplify")


@dataclass
class Run:
    name: str  # folder under --out
    method: str  # dense, per_example, unified, mesimp
    k: int | None  # None: dense
    config: TrainConfig

    @property
    def label(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "mesimp":
            return f"meSimp ({self.config.mode}) k={self.k}"
        if self.method in ("tinyprop", "mass"):
            return f"meProp per_example adaptive {self.method}, k <= {self.k}"
        return f"meProp {self.method} k={self.k}"


# --------------------------------------------------------------------------------------------
# Reading the logs


def train_seconds(record: dict) -> float:
    """Cumulative training seconds of a log record: the trainer's ``train`` wall-clock, or
    (logs written before it existed) the sum of the step phases."""
    times = record["times"]
    if "train" in times:
        return times["train"]
    return sum(times.get(k, 0.0) for k in STEP_PHASES)


def crossing(records: list[dict], target: float, key: str = "dev_accuracy") -> dict | None:
    """The first record whose ``key`` is at least ``target``, as ``{"seconds", "step",
    "epoch", "value"}`` (``seconds``: ``train_seconds``); None if no record reaches it."""
    for r in records:
        if r[key] >= target:
            return {
                "seconds": train_seconds(r),
                "step": r["step"],
                "epoch": r["epoch"],
                "value": r[key],
            }
    return None


def best(records: list[dict], key: str = "dev_accuracy") -> float:
    return max(r[key] for r in records)


def table(results: list[tuple[Run, list[dict]]], margin: float = MARGIN) -> tuple[float, list]:
    """The target (dense's best dev accuracy - margin) and one row per run: label, k, time to
    target, steps to target, best dev, total train seconds, ratio to dense's time to target,
    final widths."""
    dense = [recs for run, recs in results if run.method == "dense"]
    if not dense:
        raise ValueError("the target is set by the dense run: include dense in --methods")
    target = best(dense[0]) - margin
    dense_hit = crossing(dense[0], target)
    rows = []
    for run, recs in results:
        hit = crossing(recs, target)
        ratio = hit["seconds"] / dense_hit["seconds"] if hit and dense_hit["seconds"] else None
        widths = recs[-1].get("widths")
        rows.append(
            dict(
                label=run.label,
                k=run.k,
                seconds=hit["seconds"] if hit else None,
                steps=hit["step"] if hit else None,
                best=best(recs),
                total=train_seconds(recs[-1]),
                ratio=ratio,
                widths=list(widths.values()) if widths else list(run.config.widths()),
            )
        )
    return target, rows


def markdown(target: float, rows: list[dict], margin: float = MARGIN) -> list[str]:
    def f(v, spec):
        return "not reached" if v is None else format(v, spec)

    lines = [
        f"target: dev accuracy >= {100 * target:.2f}% (dense's best - {100 * margin:.1f} point)",
        "",
        "| method | k | time to target s | steps to target | best dev acc % | total train s | "
        "time ratio vs dense | hidden widths at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['k'] if r['k'] is not None else '-'} | {f(r['seconds'], '.1f')} "
            f"| {f(r['steps'], 'd')} | {100 * r['best']:.2f} | {r['total']:.1f} | "
            f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | "
            f"{','.join(map(str, r['widths']))} |"
        )
    return lines


def plot(results, target: float, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "the plot needs matplotlib, an optional dependency of meprop: "
            'pip install -e ".[experiments]" (or pass --no-plot)'
        ) from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, recs in results:
        xs = [train_seconds(r) for r in recs]
        ys = [100 * r["dev_accuracy"] for r in recs]
        ax.plot(xs, ys, label=run.label, lw=1.2)
    ax.axhline(100 * target, color="black", ls="--", lw=0.8, label="target")
    lo = min(100 * r["dev_accuracy"] for _, recs in results for r in recs)
    ax.set_ylim(max(lo, 100 * target - 4), 100 * max(best(recs) for _, recs in results) + 0.3)
    ax.set_xlabel("training wall-clock seconds (evaluation excluded)")
    ax.set_ylabel("dev accuracy %")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)  # off the data
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Running


def grid(args) -> list[Run]:
    base = TrainConfig(
        task="mnist",
        method="dense",
        epochs=args.epochs,
        seed=args.seed,
        train_limit=args.train_limit,
        eval_every=args.eval_every,
    )
    runs = []
    for method in args.methods:
        if method == "dense":
            runs.append(Run("dense", "dense", None, base))
        elif method in ("per_example", "unified"):
            for k in args.ks:
                cfg = replace(base, method="meprop", mode=method, k=k)
                runs.append(Run(f"meprop-{method}-k{k}", method, k, cfg))
        elif method in ("tinyprop", "mass"):  # adaptive k, per example, bounded by each k
            for k in args.ks:
                cfg = replace(base, method="meprop", k=k, adaptive=method, min_k=args.min_k,
                              mass_share=args.mass_share)  # fmt: skip
                runs.append(Run(f"adaptive-{method}-k{k}", method, k, cfg))
        else:
            cfg = replace(base, method="mesimp", mode="per_example", k=args.mesimp_k)
            runs.append(Run(f"mesimp-k{args.mesimp_k}", "mesimp", args.mesimp_k, cfg))
    return runs


def warm_up(runs: list[Run]) -> None:
    """A few steps of each run's kind of model on random data, so that no run pays for loading
    (or compiling) the kernels or first-call set-up inside its timed loop."""
    from meprop import hidden_layers, sparsify_
    from meprop.experiments.tasks.mnist import build_mlp
    from meprop.experiments.train import make_optimizer

    x, y = torch.randn(50, 784), torch.randint(0, 10, (50,))
    for run in runs:
        model = build_mlp(784, run.config.widths(), 10, dropout=0.1)
        mp = run.config.meprop_config()
        if mp is not None:
            sparsify_(model, mp, filter_fn=hidden_layers(model))
        opt = make_optimizer(run.config.optimizer, model.parameters(), 1e-3)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def train(runs: list[Run], out: Path, data_dir, sequential: bool, epochs: int) -> None:
    from meprop.experiments.train import run as train_run

    def quiet(*a, **k):
        pass

    for run in runs:  # a finished run from an earlier call with other settings is an error
        cfg_path = out / run.name / "config.json"
        if cfg_path.exists():
            saved = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k != "epochs"}
            mine = {k: v for k, v in run.config.to_dict().items() if k != "epochs"}
            if saved != mine:
                raise SystemExit(
                    f"{out / run.name} holds a run with other settings: use another --out"
                )
    order = (
        [(run, epochs) for run in runs]
        if sequential
        else [(run, e) for e in range(1, epochs + 1) for run in runs]
    )
    warm_up(runs)
    t0 = time.perf_counter()
    for i, (run, upto) in enumerate(order):
        folder = out / run.name
        log = folder / "log.jsonl"
        if log.exists() and read_log(log) and read_log(log)[-1]["epoch"] >= upto:
            continue  # trained that far by an earlier call
        cfg = replace(run.config, epochs=upto)
        resume = (folder / "config.json").exists()
        summary = train_run(
            cfg, folder, data_dir=data_dir, resume=resume, progress=False, echo=quiet
        )
        last = read_log(out / run.name / "log.jsonl")[-1]
        print(
            f"[{i + 1}/{len(order)}, {time.perf_counter() - t0:.0f} s] {run.label}: epoch {upto}, "
            f"dev {100 * last['dev_accuracy']:.2f}%, train {train_seconds(last):.1f} s"
            + (f", widths {summary['final_widths']}" if summary.get("final_widths") else ""),
            flush=True,
        )


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _methods(text: str) -> list[str]:
    methods = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown methods {bad}; choose from {METHODS}")
    return methods


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--epochs", type=int, default=20, help="epochs per run (the trainer's MNIST default: 20)"
    )
    ap.add_argument("--methods", type=_methods, default=list(METHODS), help=",".join(METHODS))
    ap.add_argument("--ks", type=_ints, default=[20, 40, 80], help="meProp's k values")
    ap.add_argument("--mesimp-k", type=int, default=160, help="meSimp's k (the README's run: 160)")
    ap.add_argument("--min-k", type=int, default=4, help="adaptive k (tinyprop, mass): least k")
    ap.add_argument("--mass-share", type=float, default=0.8, help="adaptive mass: share kept")
    ap.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all)")
    ap.add_argument(
        "--eval-every", type=int, default=0, help="steps between dev evaluations (0: 10 per epoch)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--margins",
        type=lambda t: [float(v) / 100 for v in t.split(",") if v.strip()],
        default=[MARGIN, 0.005],
        help="targets: dense's best dev accuracy minus these points, one table each "
        "(default 0.1,0.5: dev accuracy moves by a few tenths between evaluations, so the "
        "first crossing of a target this close to the best is partly chance)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--plot", type=Path, help="PNG path (default: OUT/time_to_accuracy.png)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="each run to the end in turn")
    ap.add_argument("--data-dir", type=Path, help="data root (default: $MEPROP_DATA, then cache)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")  # it sets the target
    if not args.eval_every:
        from meprop.experiments.tasks import get_task

        cfg = TrainConfig(task="mnist", train_limit=args.train_limit)
        steps = get_task(cfg, args.data_dir).steps_per_epoch(cfg.batch_size)
        args.eval_every = max(1, steps // 10)
    out = args.out or Path(tempfile.mkdtemp(prefix="meprop-tta-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = grid(args)
    header = [
        f"# time to accuracy, MNIST 784-500-500-10, Adam, batch {runs[0].config.batch_size}, "
        f"dropout {runs[0].config.dropout:g}, {args.epochs} epochs, seed {args.seed}, "
        f"train limit {args.train_limit or 'none'}, dev every {args.eval_every} steps",
        f"# {cpu_name()}; torch {torch.__version__}; {torch.get_num_threads()} "
        f"thread(s); load average at start {load_average()}; runs "
        f"{'one after another' if args.sequential else 'interleaved by epoch'} in {out}",
        "# command: python benchmarks/bench_time_to_accuracy.py "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
    ]
    print("\n".join(header), flush=True)
    train(runs, out, args.data_dir, args.sequential, args.epochs)
    results = [(run, read_log(out / run.name / "log.jsonl")) for run in runs]
    print()
    print("\n".join(header[:2]))
    print(f"# load average at end {load_average()}")
    for margin in args.margins:
        target, rows = table(results, margin)
        print("\n".join(markdown(target, rows, margin)) + "\n")
    target = table(results, args.margins[0])[0]
    if not args.no_plot:
        path = args.plot or out / "time_to_accuracy.png"
        title = (
            f"MNIST, seed {args.seed} (one run per recipe); {cpu_name()}; torch "
            f"{torch.__version__}, {torch.get_num_threads()} thread(s)"
        )
        plot(results, target, path, title)
        print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
