"""``meprop report RUN_DIR...``: tables and plots from finished runs.

Reads each run's ``config.json``, ``summary.json``, ``log.jsonl`` and (if present) ``row.json``,
and writes ``report.md`` and PNG plots. Times are per training step and ratios are taken
against the dense run with the same optimizer, depth and dropout from the same set of runs,
so they compare measurements made on one machine.

Scores are percentages (accuracy, UAS: higher is better), except a task whose metric is a
negated loss (the lm task's ``neg_bpb``, which the trainer maximises): its tables show the
loss itself (bits per byte, lower is better), its claims compare the loss, and its plots are
dev loss against steps and against training seconds, one curve per row.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .adaptive_report import adaptive_claims, adaptive_section
from .claims import claims, claims_table, fmt
from .convergence import convergence_section
from .grids import PAPER
from .runs import ReportError, Run, load_runs, reference, replicates, scan_runs
from .stats import summarize

__all__ = [
    "Run",
    "load_runs",
    "replicates",
    "claims",
    "adaptive_claims",
    "adaptive_section",
    "build_report",
]


def _table(runs: list[Run], all_runs: list[Run]) -> list[str]:
    """One line per row: scores as mean ± sd over its seeds (with min-max and the count), times
    per step as means, speedups against the dense reference's mean."""
    first = runs[0]
    lower, shown = first.lower_is_better, first.shown_metric
    unit = f"{shown} (lower is better)" if lower else f"{shown} %"
    digits = 3 if lower else 2
    # lm: the whole training step too (its attention and output layer stay dense)
    whole = first.config["task"] == "lm"
    lines = [
        f"| run | seeds | hidden | dev {unit} | test {unit} | test min-max | "
        "hidden-layer backward ms/step | speedup | linear backward ms/step | speedup | "
        "backward ms/step | speedup | forward ms/step |"
        + (" training ms/step | speedup |" * whole),
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" * whole),
    ]
    for (_, label), reps in replicates(runs).items():
        ref = reference(reps[0], all_runs)
        refs = [
            r for r in all_runs if ref is not None and (r.group, r.label) == (ref.group, ref.label)
        ]

        def ms(key, reps=reps):
            return sum(r.per_step_ms(key) for r in reps) / len(reps)

        def ratio(key, refs=refs, ms=ms):
            if not refs or ms(key) == 0:
                return "-"
            return f"{ms(key, refs) / ms(key):.2f}x"

        widths = [r.summary.get("final_widths") for r in reps]
        if all(widths):
            mean = [round(sum(w[k] for w in widths) / len(widths)) for k in widths[0]]
            hidden = "->".join(map(str, mean)) + (" (mean)" if len(reps) > 1 else "")
        else:
            hidden = "x".join(map(str, reps[0].summary["widths"]))
        test = summarize([r.shown(r.test()) for r in reps])
        dev = summarize([r.shown(r.dev()) for r in reps])
        span = f"{test.lo:.{digits}f}-{test.hi:.{digits}f}" if len(reps) > 1 else "-"
        lines.append(
            f"| {label} | {len(reps)} | {hidden} | {fmt(dev, digits)} | {fmt(test, digits)} | "
            f"{span} | {ms('hidden_backward'):.2f} | {ratio('hidden_backward')} | "
            f"{ms('linear_backward'):.2f} | {ratio('linear_backward')} | "
            f"{ms('backward'):.2f} | {ratio('backward')} | {ms('forward'):.2f} |"
            + (f" {ms('train'):.1f} | {ratio('train')} |" if whole else "")
        )
    return lines


def _plots(runs: list[Run], out: Path) -> list[str]:
    """The report's plots (``meprop.experiments.plots``): names of the PNGs written in ``out``."""
    from .plots import task_plots

    return task_plots(runs, list(replicates(runs).values()), out)


PAPER_TITLES = {
    "mnist": "MNIST",
    "pos": "POS tagging on the Penn Treebank; ours is UD English EWT XPOS",
    "parse": "parsing on the Penn Treebank, UAS; ours is UD English EWT",
}
GROUP_TITLES = {
    "main": "dense vs meProp (Adam)",
    "ratio": "accuracy vs backprop ratio k/h",
    "control": "controls: random-k and a k-dimensional network",
    "symmetric": "per example with the sign balance kept (symmetric top-k)",
    "adaptive": "adaptive k against fixed k",
    "mesimp": "meSimp, and dense nets trained at meSimp's final widths",
    "adagrad": "AdaGrad",
    "depth": "deeper networks",
    "dropout": "without dropout",
    "meact": "dense vs meAct (same seed)",
    "lenet": "LeNet-5: dense vs meProp on the convolutions and hidden layers",
    "resnet": "a small ResNet: dense vs meProp on the convolutions",
    "tuning": "dense at other learning rates and dropouts (one seed each): the shared "
    "settings chosen on dev",
    "runs": "runs",
}


def _settings_run(runs: list[Run]) -> Run:
    """The run whose settings the settings line gives: the first run labelled plain "dense"
    (not a control such as "dense at the widths of ..."), else the first dense run, else the
    first run."""
    dense = [r for r in runs if r.method == "dense"]
    return next((r for r in dense if r.label == "dense"), dense[0] if dense else runs[0])


# Settings that a grid's row labels never name (they name method, k, mode, optimizer, lr,
# dropout, depth where a row differs in them): a row that differs from the settings line in
# one of these says so in its label.
UNNAMED = ("dataset", "epochs", "batch_size", "train_limit", "eval_every")


def _name_unshared(runs: list[Run]) -> None:
    """Append to a row's label the ``UNNAMED`` settings in which its runs differ from the
    settings line's run (``"k-dim net k=10 (epochs 15)"``), unless the label names them already
    (runs of one label but other settings: ``distinct_rows``)."""
    ref = _settings_run(runs).config
    for r in runs:
        named = [f"{k} {json.dumps(r.config.get(k))}" for k in UNNAMED
                 if r.config.get(k) != ref.get(k)]  # fmt: skip
        extra = [n for n in named if n not in r.label]
        if extra:
            r.label = f"{r.label} ({', '.join(extra)})"


def _settings(runs: list[Run]) -> list[str]:
    """The shared settings, from ``_settings_run``'s run."""
    r = _settings_run(runs)
    c = r.config
    every = f"every {c['eval_every']} steps" if c.get("eval_every") else "once per epoch"
    limit = f"the first {c['train_limit']} training examples" if c.get("train_limit") else "all"
    text = (
        f"Settings ({r.label}; the other rows differ in method, k and mode, and where their "
        f"label says so): task {c['task']}, hidden {'x'.join(map(str, r.summary['widths']))}, "
        f"batch {c['batch_size']}, {c['epochs']} epoch{'s' * (c['epochs'] != 1)} "
        f"({r.summary['steps']} steps), "
        f"{c['optimizer']} lr {c['lr'] or 'default'}, dropout {c['dropout']:g}, training data: "
        f"{limit}, dev evaluation {every}."
    )
    if c["task"] == "lm":
        from .tasks.lm import N_HEAD, LmTask, d_model_for

        width = r.summary["widths"][0]
        text += (
            f" lm: {len(r.summary['widths'])} pre-norm blocks, d_model "
            f"{c.get('d_model') or d_model_for(width)}, MLP width {width}, {N_HEAD} heads, "
            f"windows of {LmTask.block_size} bytes; meProp on "
            + ("mlp.fc only" if c.get("fc_only") else "the MLP projections")
            + (" and the attention projections" if c.get("sparse_attention") else "")
            + "."
        )
    return [text, ""]


def build_report(paths: list[Path], out: Path) -> Path:
    """Write ``out/report.md`` (and PNG plots beside it) from the runs in ``paths``."""
    runs, notes = _sorted_runs(paths)
    _name_unshared(runs)
    _check_out(out)
    lines = _heading(runs, paths)
    if notes:
        lines += [
            "**Not in this report** (each table, speedup and claim below uses only the runs it "
            "names; those that would need a run listed here are not shown):",
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    lines += _settings(runs)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    for group, members in groups.items():
        lines += [f"## {GROUP_TITLES.get(group, group)}", ""] + _table(members, runs) + [""]
        if group == "tuning":
            lines += _tuning_verdict(members, groups.get("main", []))
    lines += claims_table(runs)
    lines += convergence_section(runs)
    lines += adaptive_section(runs, out)
    if all(r.config.get("model", "mlp") == "mlp" for r in runs):  # (the paper's are MLPs)
        lines += _published(runs[0].config["task"])
    for name in _plots(runs, out):
        lines += [f"![{name}]({name})", ""]
    if any(r.method == "meact" for r in runs):
        from .meact_report import section

        lines += section(runs, out)
    report = out / "report.md"
    try:
        report.write_text("\n".join(lines))
    except OSError as e:
        from meprop.checkpoint import write_error

        raise write_error(report, e) from None
    for n in notes:
        print(f"note: {n}")
    return report


def _sorted_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The finished runs in ``paths`` in the report's order (by group, then folder), and the
    notes on those left out; none at all is a ``ReportError``."""
    order = list(GROUP_TITLES)
    found, notes = scan_runs(paths)
    runs = sorted(
        found,
        key=lambda r: (
            order.index(r.group) if r.group in order else len(order),
            r.group,
            r.path.name,
        ),
    )
    if not runs:
        raise ReportError(
            f"no finished runs in {', '.join(map(str, paths))}"
            + "".join(f"; {n}" for n in notes[:3])
        )
    return runs, notes


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(
            f"cannot make the report folder {out}: {e.strerror}: give another --out"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ReportError(
            f"cannot write the report in {out} (read-only): give --out a writable folder"
        )


def _heading(runs: list[Run], paths: list[Path]) -> list[str]:
    """The title and the line that says where and with what the runs were made."""
    first = runs[0].summary
    origin = runs[0].extra
    seeds = sorted({r.seed for r in runs})
    machine, made = _made_where(runs)
    threads = "" if "machine" in origin else f", {first['threads']} threads"
    return [
        "# meprop results",
        "",
        f"{len(runs)} runs, seeds {','.join(map(str, seeds))}; {machine}; torch "
        f"{first['torch']}{threads}; {made}{_grid_time(paths)}.",
        "",
        "Scores are the test score of the checkpoint with the best dev score, as mean ± "
        "standard deviation over the seeds a row ran with (min-max beside). Every method uses "
        "the same shared settings (learning rate, dropout, batch size, epochs: the task's "
        "defaults); none is tuned per method. Times are per training step; speedups are "
        "against the dense run of the same optimizer, depth and dropout in this set (measured "
        "in the same grid, on the same machine).",
        "",
    ]


def _made_where(runs: list[Run]) -> tuple[str, str]:
    """The machine and the meprop version (with its commit) of the runs; runs made on several
    machines name each with how many runs it made (times compare within one machine only)."""
    origin = runs[0].extra
    machine = origin.get("machine", "machine not recorded")
    made = f"meprop {origin['meprop']}" if "meprop" in origin else "meprop"
    if origin.get("commit"):
        made += f" (commit {origin['commit']})"
    counts: dict[str, int] = {}
    for r in runs:
        m = r.extra.get("machine", "machine not recorded")
        counts[m] = counts.get(m, 0) + 1
    if len(counts) > 1:
        machine = "; ".join(f"{n} runs on {m}" for m, n in counts.items())
        versions = {f"{r.extra.get('meprop', '?')} (commit {r.extra.get('commit', '?')})"
                    for r in runs}  # fmt: skip
        made = "meprop " + ", ".join(sorted(versions))
    return machine, made


def _grid_time(paths: list[Path]) -> str:
    """ "; grid time ..." from the results folder's grid.json (given, or above the runs/NAME
    folders given), or ""."""
    grid = {}
    for folder in {f for p in map(Path, paths) for f in (p, p.parent.parent)}:
        if (folder / "grid.json").exists():
            grid = json.loads((folder / "grid.json").read_text())
    if "seconds" not in grid:
        return ""
    sec = grid["seconds"]
    span = f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.1f} min"
    return f"; grid time {span} (summed over its sittings and parallel processes)"


def _published(task: str) -> list[str]:
    """The paper's figures for ``task``, where it has some."""
    if task not in PAPER:
        return []
    return [
        f"## Published figures (Sun et al., {PAPER_TITLES[task]}, hidden 500)",
        "",
        "| figure | paper |",
        "| --- | ---: |",
        *[f"| {k} | {v} |" for k, v in PAPER[task].items()],
        "",
        "The paper's speedups are against the authors' own dense code; ours are "
        "against PyTorch's dense kernels.",
        "",
    ]


def _tuning_verdict(tuning: list[Run], main: list[Run]) -> list[str]:
    """Which tuning run has the best dev score, and whether it is the shared settings (the
    main dense row's learning rate and dropout), on the seed the tuning runs share."""
    seeds = {r.seed for r in tuning}
    shared = [r for r in main if r.method == "dense" and r.seed in seeds]
    if not tuning or not shared:
        return []
    key = f"dev_{tuning[0].metric}"
    ref = shared[0]
    pool = {r.path.name: r for r in [*tuning, ref] if r.seed == ref.seed}
    ranked = sorted(pool.values(), key=lambda r: r.summary[key], reverse=True)
    scale = 1 if ref.lower_is_better else 100

    def settings(r):
        return f"lr {r.config['lr'] or 'default'}, dropout {r.config['dropout']:g}"

    def score(r):  # bits per byte to 3 decimals, accuracies (%) to 2
        return f"{scale * abs(r.summary[key]):.{3 if ref.lower_is_better else 2}f}"

    best = ranked[0]
    others = [r for r in ranked if settings(r) != settings(ref)]
    tied = [settings(r) for r in others if r.summary[key] == ref.summary[key]]
    if ref.summary[key] >= best.summary[key]:
        verdict = "are the best" + (f" (tied with {', '.join(tied)})" if tied else "")
    else:
        rank = 1 + sum(r.summary[key] > ref.summary[key] for r in ranked)
        verdict = (
            f"are not the best: {settings(best)} scores {score(best)} (number {rank} of "
            f"{len(ranked)})"
        )
    return [
        f"On dev (seed {ref.seed}), the shared settings ({settings(ref)}: {score(ref)}) {verdict}; "
        f"the others: " + ", ".join(f"{settings(r)} {score(r)}" for r in others[:3]) + ".",
        "",
    ]


def _report(args: argparse.Namespace) -> None:
    out = args.out or (Path(args.runs[0]) if len(args.runs) == 1 else Path("report"))
    print(f"report: {build_report(args.runs, out)}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="rebuild tables and plots from finished runs", description=__doc__
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories or results folders")
    p.add_argument("--out", type=Path, help="folder for report.md and plots")
    p.set_defaults(func=_report)
