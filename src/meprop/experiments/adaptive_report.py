"""The adaptive-k section of a report: adaptive k against fixed k at the same bound, paired
over seeds (dev score, mean k kept, steps to a target), and its plot."""

from __future__ import annotations

from pathlib import Path

from .claims import fmt, fmt_paired
from .runs import Run, replicates
from .stats import Paired, paired, summarize

__all__ = ["adaptive_claims", "adaptive_section"]


def _adaptive(r: Run) -> bool:
    """The run chose its k at every backward (``--adaptive``), under the bound ``k``."""
    return bool(r.config.get("adaptive"))


def _setup(r: Run) -> tuple:
    """What besides k, mode and the k rule makes runs comparable: same task, data, network,
    optimizer, dropout, batch and epochs."""
    c = r.config
    keys = ("task", "dataset", "optimizer", "dropout", "batch_size", "epochs", "lr")
    return (*(c.get(k) for k in keys), tuple(r.summary["widths"]))


def _bound(r: Run) -> float:
    """The k a fixed-k run keeps (its bound for an adaptive one): ``min(k, width)``, mean over
    the hidden layers."""
    widths = r.summary["widths"] or [r.config["k"]]
    return sum(min(r.config["k"], w) for w in widths) / len(widths)


def _k_records(r: Run) -> list[dict]:
    """The epoch records that log ``mean_k`` (each epoch's last)."""
    return [e for e in r.log if e.get("mean_k")]


def _mean_ks(r: Run) -> tuple[float, float]:
    """(mean k over training: over epochs and layers; mean k in the last epoch), from the log's
    ``mean_k``; a fixed-k run that did not log it kept its bound throughout."""
    recs = _k_records(r)
    if not recs:
        if _adaptive(r):
            raise ValueError(f"{r.path}: an adaptive-k run without mean_k in its log.jsonl")
        return _bound(r), _bound(r)
    per_epoch = [sum(e["mean_k"].values()) / len(e["mean_k"]) for e in recs]
    return sum(per_epoch) / len(per_epoch), per_epoch[-1]


def _rule(r: Run) -> str:
    """How the run chose k: ``fixed``, ``tinyprop`` or ``mass 0.8`` (with the share kept)."""
    rule = r.config.get("adaptive") or "fixed"
    return f"mass {r.config.get('mass_share', 0.9):g}" if rule == "mass" else rule


def _dev_key(r: Run) -> str:
    return f"dev_{r.metric}"


def _best_dev(r: Run) -> float:
    """The run's best dev score as logged (higher is better; the negated loss for ``neg_``)."""
    key = _dev_key(r)
    scores = [e[key] for e in r.log if key in e]
    return max(scores) if scores else r.summary[key]


def _crossing(r: Run, target: float) -> tuple[int, float] | None:
    """(step, cumulative training seconds) at the first evaluation whose dev score reaches
    ``target``; None if none does."""
    key = _dev_key(r)
    for e in r.log:
        if key in e and e[key] >= target:
            return e["step"], e["times"].get("train", 0.0)
    return None


def _adaptive_rows(runs: list[Run]) -> list[tuple[list[Run], list[Run]]]:
    """Per mode of the adaptive rows: (the adaptive rows' runs, the fixed-k meProp rows' runs of
    that mode and setup, any group), as replicate lists; fixed rows by k."""
    rows = replicates(runs)
    adaptive = [reps for reps in rows.values() if _adaptive(reps[0])]
    out = []
    for mode in dict.fromkeys(reps[0].config["mode"] for reps in adaptive):
        mine = [reps for reps in adaptive if reps[0].config["mode"] == mode]
        setups = {_setup(reps[0]) for reps in mine}
        fixed = [
            reps
            for reps in rows.values()
            if reps[0].method == "meprop"
            and not _adaptive(reps[0])
            and reps[0].config["mode"] == mode
            and _setup(reps[0]) in setups
        ]
        fixed.sort(key=lambda reps: reps[0].config["k"])
        out.append((mine, fixed))
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _test_mean(reps: list[Run]) -> float:
    return _mean(r.test() for r in reps)


def adaptive_claims(runs: list[Run]) -> list[tuple[str, Paired, str]]:
    """Each adaptive-k row against fixed k of its mode, paired on the seeds both sides share:
    against the fixed row at its bound k, and against the fixed k with the highest mean test
    score (one claim where they are the same row). Same shape as ``claims``."""
    lower = bool(runs) and runs[0].lower_is_better
    ge = "at least as good as" if lower else ">="
    out = []
    for adaptive, fixed in _adaptive_rows(runs):
        if not fixed:
            continue
        best = max(fixed, key=_test_mean)
        for reps in adaptive:
            label, k = reps[0].label, reps[0].config["k"]
            mine = {r.seed: r.test() for r in reps}
            at_bound = [f for f in fixed if f[0].config["k"] == k]
            at = max(at_bound, key=len) if at_bound else None
            for other, what in ((at, "its bound"), (best, "the best fixed k")):
                if other is None or (what == "the best fixed k" and other is at):
                    continue
                fk = other[0].config["k"]
                mode = other[0].config["mode"]
                both = " = the best fixed k" if other is best and what == "its bound" else ""
                p = paired(mine, {r.seed: r.test() for r in other})
                if p is not None:
                    out.append(
                        (
                            f"{label} {ge} fixed k={fk} ({what}{both})",
                            p,
                            f"{label} - meProp {mode} k={fk}",
                        )
                    )
    return out


def _adaptive_plot(adaptive: list[list[Run]], out: Path) -> str | None:
    """k against training steps per adaptive row and layer (``meprop.experiments.plots.adaptive_plot``)."""
    from .plots import adaptive_plot

    bounds = sorted({(_bound(reps[0]), reps[0].config["k"]) for reps in adaptive})
    return adaptive_plot(adaptive, bounds, out)


def adaptive_section(runs: list[Run], out: Path) -> list[str]:
    """The section "Adaptive k": the adaptive-k rows beside the fixed-k meProp rows of their mode (mean
    k, its reduction against the bound, backward time, time to a shared dev target), the paired
    claims (``adaptive_claims``) and the plot ``adaptive_k.png``. Empty without adaptive rows."""
    groups = _adaptive_rows(runs)
    if not groups:
        return []
    first = runs[0]
    lower, shown = first.lower_is_better, first.shown_metric
    unit = f"{shown} (lower is better)" if lower else f"{shown} %"
    digits = 3 if lower else 2
    table = [reps for adaptive, fixed in groups for reps in (*adaptive, *fixed)]
    # every run's best dev reaches the lowest of them
    target = min(_best_dev(r) for reps in table for r in reps)
    shown_target = -target if lower else 100 * target

    lines = [
        "## Adaptive k",
        "",
        "Adaptive k chooses each layer's k at every backward, between `--min-k` and the bound "
        "`k` (TinyProp: from the error's size against the largest seen so far; mass: the "
        "fewest entries holding the given share of each row's |gradient|). Beside them, every "
        "fixed-k meProp row of the same mode and settings (any group). *mean k*: the mean of "
        "the logged per-epoch mean k over epochs and hidden layers (a fixed-k row that did "
        "not log it: min(k, width)); *last epoch*: the last epoch's, and its reduction against the bound. Test "
        f"scores as mean ± sd (seeds). *To target*: the first evaluation whose dev {shown} "
        f"reaches {shown_target:.{digits}f}"
        + (" (lower is better)" if lower else " %")
        + ", the lowest best dev score of any run in this table (so every run reaches it), "
        "as training steps and cumulative training seconds (evaluations excluded), mean over "
        "seeds; '-' where a run never reaches it.",
        "",
        "The runs were measured on a shared machine whose load varied: times compare within "
        "one grid (rows run together) only. Rows of different groups may come from different "
        "grids, run at different times: the commit column names the code each row ran; rows "
        "of different commits were not measured together.",
        "",
        f"| run | group | k rule | bound k | test {unit} (seeds) | mean k | mean k, last epoch | "
        "reduction vs bound | linear backward ms/step | steps to target | seconds to target "
        "| commit |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [_adaptive_row(reps, target, digits) for reps in table]
    lines.append("")
    lines += _adaptive_claims_table(runs, lower, shown, digits)
    name = _adaptive_plot([reps for adaptive, _ in groups for reps in adaptive], out)
    if name:
        lines += [f"![{name}]({name})", ""]
    return lines


def _adaptive_row(reps: list[Run], target: float, digits: int) -> str:
    """One row of the adaptive-k table: the test score, the mean k, the backward time and the
    steps and seconds to ``target`` of a row's runs."""
    r0 = reps[0]
    test = summarize([r.shown(r.test()) for r in reps])
    ks = [_mean_ks(r) for r in reps]
    over, last = _mean(k for k, _ in ks), _mean(k for _, k in ks)
    cut = 100 * (1 - last / _bound(r0))
    linear = _mean(r.per_step_ms("linear_backward") for r in reps)
    hits = [_crossing(r, target) for r in reps]
    if all(hits):
        steps = f"{_mean(h[0] for h in hits):.0f}"
        sec = _mean(h[1] for h in hits)
        secs = f"{sec:.1f}" if sec >= 10 else f"{sec:.2f}"
    else:
        steps = secs = "-"
    commits = ", ".join(dict.fromkeys(r.extra.get("commit", "?") for r in reps))
    return (
        f"| {r0.label} | {r0.group} | {_rule(r0)} | {r0.config['k']} | "
        f"{fmt(test, digits)} ({test.n}) | {over:.1f} | {last:.1f} | {cut:.1f}% | "
        f"{linear:.3f} | {steps} | {secs} | {commits} |"
    )


def _adaptive_claims_table(runs: list[Run], lower: bool, shown: str, digits: int) -> list[str]:
    rows = adaptive_claims(runs)
    if not rows:
        return []
    column = f"difference ({shown} of fixed - adaptive)" if lower else "difference (points)"
    return [
        "Adaptive k against fixed k, paired over seeds (test score, same seeds: the mean "
        "difference adaptive - fixed with its 95% t-interval; *holds*: above 0, *does not "
        "hold*: below 0, *undecided*: contains 0):",
        "",
        f"| claim | {column} [95% interval] | seeds | verdict |",
        "| --- | --- | ---: | --- |",
        *[f"| {c} | {fmt_paired(p, digits)} | {p.n} | {p.verdict} |" for c, p, _ in rows],
        "",
    ]
