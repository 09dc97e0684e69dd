"""The paper's claims, and the settings' claims, checked on the runs: each comparison a
sentence makes, as a paired difference over seeds with its interval and verdict."""

from __future__ import annotations

from .runs import Run, replicates
from .stats import Paired, paired

__all__ = ["claims", "claims_table", "fmt", "fmt_paired"]


def fmt(s, digits: int) -> str:
    """A ``Summary`` with ``digits`` decimals (bits per byte need three)."""
    return f"{s.mean:.{digits}f}" + (f" ± {s.sd:.{digits}f}" if s.n > 1 else "")


class _Claims:
    """What the claims are made from: the runs, the notes on claims not made, the claims made
    (``out``), and the words of a comparison (``ge``, ``gt``)."""

    def __init__(self, runs: list[Run], notes: list[str]) -> None:
        self.runs, self.notes, self.out = runs, notes, []
        lower = bool(runs) and runs[0].lower_is_better
        self.ge, self.gt = ("at least as good as", "better than") if lower else (">=", ">")
        self.dense = self.scores(lambda r: r.method == "dense" and r.group == "main")

    def scores(self, pred) -> dict[int, float] | list[str]:
        """The test scores by seed of the one row whose runs ``pred`` picks; the rows' labels
        where it picks several (a claim never pools two rows)."""
        picked = [r for r in self.runs if pred(r)]
        labels = sorted({r.label for r in picked})
        if len(labels) > 1:
            return labels
        return {r.seed: r.test() for r in picked}

    def add(self, claim, a, b, what) -> None:
        several = [side for side in (a, b) if isinstance(side, list)]
        if several:
            self.notes.append(
                f"{claim}: not made, several rows match one side ({'; '.join(several[0])})"
            )
            return
        p = paired(a, b)
        if p is not None:
            self.out.append((claim, p, what))


def claims(runs: list[Run], notes: list[str] | None = None) -> list[tuple[str, Paired, str]]:
    """The paper's claims, each a paired comparison on the seeds both sides share: (claim,
    the test-score difference a - b with its 95% interval, which runs).

    A claim whose side would take runs of several rows is not made (a note in ``notes``).
    Scores are higher-is-better (``Run.test``): for a negated loss (``neg_bpb``) the difference
    a - b is b's loss minus a's, positive where a's loss is lower; the claims then say "at
    least as good as" and "better than" rather than ">=" and ">"."""
    c = _Claims(runs, [] if notes is None else notes)
    ks = sorted({r.config["k"] for r in runs if r.method == "meprop" and r.group == "main"})
    for k in ks:
        _meprop_claims(c, k)
    _symmetric_claims(c)
    _ratio_claims(c, ks)
    _mesimp_claims(c)
    _cnn_claims(c)
    return c.out + _setting_claims(runs, c.ge, c.gt)


CNN_GROUPS = ("lenet", "resnet")  # the cnn grid's (meprop reproduce cnn)


def _cnn_claims(c: _Claims) -> None:
    """The cnn grid: every meProp and random-k row of a network against its dense run (with
    precise BN, ``bn_batches``, against the dense run evaluated the same way)."""
    for group in CNN_GROUPS:
        labels = {
            (r.label, r.config.get("bn_batches", 0))
            for r in c.runs
            if r.group == group and r.method != "dense"
        }
        for label, bn in sorted(labels):
            dense = c.scores(
                lambda r, group=group, bn=bn: r.group == group and r.method == "dense"
                and r.config.get("bn_batches", 0) == bn
            )  # fmt: skip
            rows = c.scores(
                lambda r, group=group, label=label: r.group == group and r.label == label
            )
            against = "dense, precise BN" if bn else "dense"
            c.add(f"{group}: {label} {c.ge} {against}", rows, dense, f"{label} - {against}")


def _main_opt(r: Run) -> bool:
    return r.config["optimizer"] == "adam" and r.group in ("main", "control", "mesimp")


def _main_meprop(r: Run, k: int, mode: str, fc: bool = False) -> bool:
    """A main-group meProp run at ``k`` in ``mode`` (``fc``: the lm task's mlp.fc only)."""
    return (
        r.method == "meprop"
        and r.group == "main"
        and r.config["k"] == k
        and r.config["mode"] == mode
        and bool(r.config.get("fc_only")) == fc
    )


def _meprop_claims(c: _Claims, k: int) -> None:
    """meProp at ``k`` against dense, random-k and a dense net of width k; unified against
    per_example."""
    ge, gt = c.ge, c.gt
    for mode in ("per_example", "unified"):
        for fc in (False, True):  # lm: meProp on mlp.fc only (TrainConfig.fc_only)
            mp = c.scores(lambda r, mode=mode, fc=fc: _main_meprop(r, k, mode, fc))
            name = f"meProp {mode} k={k}" + (" on mlp.fc only" if fc else "")
            c.add(f"{name} {ge} dense", mp, c.dense, f"{name} - dense")
    top = c.scores(lambda r: _main_meprop(r, k, "per_example"))
    rand = c.scores(lambda r: r.method == "random" and r.config["k"] == k and _main_opt(r))
    c.add(f"top-k {gt} random-k (k={k})", top, rand, f"meProp per_example k={k} - random-k")
    uni = c.scores(lambda r: _main_meprop(r, k, "unified"))
    c.add(f"unified top-k {gt} random-k (k={k})", uni, rand, f"meProp unified k={k} - random-k")
    c.add(f"meProp unified k={k} {ge} per_example k={k}", uni, top,
          f"meProp unified k={k} - per_example k={k}")  # fmt: skip
    kdim = c.scores(lambda r: r.method == "kdim" and r.config["k"] == k and _main_opt(r))
    c.add(f"meProp {gt} a dense net of width k={k}", top, kdim, f"meProp per_example k={k} - k-dim")


def _symmetric_claims(c: _Claims) -> None:
    """Symmetric per-example selection (docs/per_example.md): against dense and per_example."""
    for k in sorted({r.config["k"] for r in c.runs if r.config.get("mode") == "symmetric"}):
        sym = c.scores(lambda r, k=k: r.config.get("mode") == "symmetric" and r.config["k"] == k
                       and r.method == "meprop")  # fmt: skip
        pe = c.scores(lambda r, k=k: r.method == "meprop" and r.group == "main"
                      and r.config["mode"] == "per_example" and r.config["k"] == k)  # fmt: skip
        c.add(
            f"meProp symmetric k={k} {c.ge} dense", sym, c.dense, f"meProp symmetric k={k} - dense"
        )
        c.add(f"meProp symmetric k={k} {c.gt} per_example k={k}", sym, pe,
              f"meProp symmetric k={k} - per_example k={k}")  # fmt: skip


def _ratio_claims(c: _Claims, ks: list[int]) -> None:
    """The k sweep's rows with several seeds (the paper's MNIST claim is at k=80): against
    dense (the k of the main rows are claimed there)."""
    swept: dict[tuple[int, str], list[Run]] = {}
    for r in c.runs:
        if r.method == "meprop" and r.group == "ratio" and not r.config.get("adaptive"):
            swept.setdefault((r.config["k"], r.config["mode"]), []).append(r)
    for (k, mode), picked in sorted(swept.items()):
        mp = c.scores(lambda r, picked=picked: r in picked)
        if len(mp) >= 2 and k not in ks:
            c.add(f"meProp {mode} k={k} {c.ge} dense", mp, c.dense, f"meProp {mode} k={k} - dense")


def _mesimp_claims(c: _Claims) -> None:
    """meSimp against dense (at the share of the width it kept) and against a dense net
    trained at its final widths."""
    dense_runs = [r for r in c.runs if r.method == "dense" and r.group == "main"]
    simplified = [r for r in c.runs if r.method == "mesimp" and r.config["optimizer"] == "adam"]
    for (_group, label), reps in replicates(simplified).items():
        simp = {r.seed: r.test() for r in reps}
        pct = _width_share(reps, dense_runs)
        c.add(f"{label} {c.ge} dense, at {pct} of the width", simp, c.dense, f"{label} - dense")
        names = {r.path.name for r in reps}
        sized = {
            r.seed: r.test()
            for r in c.runs
            if r.path.name.startswith("dense-size-of-")
            and r.path.name.removeprefix("dense-size-of-") in names
        }
        c.add(f"{label} {c.gt} a dense net trained at its final widths", simp, sized,
              f"{label} - dense at its widths")  # fmt: skip


def _width_share(reps: list[Run], dense_runs: list[Run]) -> str:
    """meSimp's mean share of the dense width (without a dense run: of its own start): of the
    scored checkpoints (best dev) where they differ from the final widths."""
    full = max(max(r.summary["widths"]) for r in [*dense_runs, *reps]) or 1
    share = [
        100 * sum(r.summary["final_widths"].values()) / (full * len(r.summary["final_widths"]))
        for r in reps
        if r.summary.get("final_widths")
    ]
    pct = f"{sum(share) / len(share):.0f}%" if share else "?"
    best = [100 * sum(r.summary["best_widths"]) / (full * len(r.summary["best_widths"]))
            for r in reps if r.summary.get("best_widths")]  # fmt: skip
    if share and len(best) == len(reps) and f"{sum(best) / len(best):.0f}%" != pct:
        pct = f"{sum(best) / len(best):.0f}% (the scored checkpoints; {pct} at the end)"
    return pct


def _setting_claims(runs: list[Run], ge: str, gt: str) -> list[tuple[str, Paired, str]]:
    """The paper's claims about settings, each paired on the seeds both sides share: meProp
    against dense under AdaGrad ("independent of the optimizer"), at each depth of the
    ``depth`` rows ("deeper networks do not hurt meProp"), and dropout against none for dense
    and for each meProp mode of the ``dropout`` rows."""
    out = []

    def pick(pred) -> dict[int, float]:
        return {r.seed: r.test() for r in runs if pred(r)}

    def add(claim, a, b, what):
        p = paired(a, b)
        if p is not None:
            out.append((claim, p, what))

    ada_dense = pick(lambda r: r.group == "adagrad" and r.method == "dense")
    for (_, label), reps in replicates(
        [r for r in runs if r.group == "adagrad" and r.method == "meprop"]
    ).items():
        add(f"{label} {ge} dense AdaGrad", {r.seed: r.test() for r in reps}, ada_dense,
            f"{label} - dense AdaGrad")  # fmt: skip
    depth = [r for r in runs if r.group == "depth"]
    for n in sorted({len(r.summary["widths"]) for r in depth}):
        at = [r for r in depth if len(r.summary["widths"]) == n]
        dense = {r.seed: r.test() for r in at if r.method == "dense"}
        for (_, label), reps in replicates([r for r in at if r.method == "meprop"]).items():
            add(f"{label} {ge} dense, {n} hidden layers", {r.seed: r.test() for r in reps},
                dense, f"{label} - dense {n} layers")  # fmt: skip
    no_drop = [r for r in runs if r.group == "dropout"]
    for r0 in {(r.method, r.config.get("mode"), r.config.get("k")) for r in no_drop}:
        method, mode, k = r0

        def same(r, method=method, mode=mode, k=k):
            if r.method != method or r.config["optimizer"] != "adam":
                return False
            return method == "dense" or (r.config["mode"] == mode and r.config["k"] == k)

        without = pick(lambda r, same=same: r.group == "dropout" and same(r))
        with_ = pick(lambda r, same=same: r.group == "main" and same(r))
        name = "dense" if method == "dense" else f"meProp {mode} k={k}"
        add(f"{name} with dropout {gt} without", with_, without,
            f"{name}: dropout - no dropout")  # fmt: skip
    return sorted(out, key=lambda c: c[0])


def claims_table(runs: list[Run]) -> list[str]:
    notes: list[str] = []
    rows = claims(runs, notes)
    if not rows:
        return [f"- {n}" for n in notes] + ([""] if notes else [])
    first = runs[0]
    metric = first.metric
    if first.lower_is_better:
        shown = first.shown_metric
        what = (
            f"test {shown} (lower is better) on the same seeds (same initialisation and data "
            f"order): the mean difference, the other side's {shown} minus the claim's side's, "
            f"so positive means the claim's side has the lower {shown},"
        )
        column = f"difference ({shown} of the other side - claim's side)"
        digits = 3
    else:
        what = (
            f"test {metric} on the same seeds (same initialisation and data order): the mean "
            "difference,"
        )
        column = "difference (points)"
        digits = 2
    lines = [
        "## The paper's claims, paired over seeds",
        "",
        f"Each claim compares {what} with its 95% t-interval. *holds*: the interval is above 0; "
        "*does not hold*: below 0; *undecided*: it contains 0.",
        "",
        f"| claim | {column} [95% interval] | seeds | verdict |",
        "| --- | --- | ---: | --- |",
    ]
    lines += [f"| {c} | {fmt_paired(p, digits)} | {p.n} | {p.verdict} |" for c, p, _ in rows]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return lines + [""]


def fmt_paired(p: Paired, digits: int) -> str:
    if p.n < 2:
        return f"{p.mean:+.{digits}f} (1 pair)"
    return f"{p.mean:+.{digits}f} [{p.lo:+.{digits}f}, {p.hi:+.{digits}f}]"
