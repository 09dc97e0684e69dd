"""``meprop reproduce meact``: the extended paper's meAct analysis on MNIST, and its report.

Two runs from the same seed (so the same initialisation and batch order): the dense baseline
and meAct, identical until meAct starts. The report puts side by side, per epoch, their dev
accuracy, the average absolute parameter change per iteration (``meprop.update_monitor``) and meAct's
active neurons per example, beside the paper's claims: accuracy rises after meAct starts, and
the update drops sharply. The full grid adds meAct with float32 state (does the float16 state
change the result?), meAct at a lower and a higher threshold (how sensitive is it?) and both
runs from two more seeds (how typical is the first seed's curve?).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .train import TrainConfig

__all__ = ["grid", "section", "PAPER_CLAIMS"]

PAPER_CLAIMS = [
    "on MNIST, on average a small fraction of the neurons per example suffices (the paper's "
    "Table reports the active neurons per layer; its numbers are not in our copy of the text)",
    "accuracy rises after meAct starts, above the baseline from the same initialisation",
    "the average absolute parameter update per iteration drops sharply when meAct starts, "
    "while the baseline's stays high",
]


def grid(quick: bool = False, dataset: str = "mnist") -> list:
    """The runs: dense and meAct from the same seed (full: + float32 state, other thresholds,
    other seeds)."""
    from .grids import Row

    base = TrainConfig(
        task="mnist",
        dataset=dataset,
        method="dense",
        # quick: all the data (on a 10,000-example subset meAct after 3 epochs lowers accuracy:
        # the cached outputs go stale while the network still changes fast), fewer epochs
        epochs=6 if quick else 20,
        meact_start=4 if quick else 10,
        # batches of 100 without dropout: meAct's own setting (dropout would perturb the
        # cached outputs of inactive neurons)
        batch_size=100,
        dropout=0.0,
        track_updates=True,  # the baseline's update is compared with meAct's
    )
    meact = replace(base, method="meact")
    rows = [
        Row("dense", "meact", "dense (baseline)", base),
        Row("meact", "meact", f"meAct {meact.meact_threshold:g}%", meact),
    ]
    if not quick:
        rows.append(
            Row(
                "meact-float32",
                "meact",
                f"meAct {meact.meact_threshold:g}%, float32 state",
                replace(meact, meact_storage="float32"),
            )
        )
        for threshold in (0.3, 1.0):
            rows.append(
                Row(
                    f"meact-{threshold:g}",
                    "meact",
                    f"meAct {threshold:g}%",
                    replace(meact, meact_threshold=threshold),
                )
            )
        for seed in (2, 3):  # how typical is seed 1's curve?
            rows.append(
                Row(f"dense-seed{seed}", "meact", f"dense (seed {seed})", replace(base, seed=seed))
            )
            rows.append(
                Row(
                    f"meact-seed{seed}",
                    "meact",
                    f"meAct {meact.meact_threshold:g}% (seed {seed})",
                    replace(meact, seed=seed),
                )
            )
    return rows


def _per_step_ms(run, key: str, lo: int, hi: int) -> float | None:
    """Mean ms per training step of a cumulative time ``key`` over log records [lo, hi)."""
    if hi <= lo or hi > len(run.log):
        return None
    before = run.log[lo - 1] if lo > 0 else {"step": 0, "times": {}}
    after = run.log[hi - 1]
    steps = after["step"] - before["step"]
    seconds = after["times"].get(key, 0.0) - before["times"].get(key, 0.0)
    return 1000 * seconds / steps if steps else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _before(run, start: int) -> list[dict]:
    """The run's log records before meAct starts, without times and meAct's own keys."""
    drop = {"times", "meact", "active"}
    return [{k: v for k, v in e.items() if k not in drop} for e in run.log[:start]]


def section(runs: list, out: Path) -> list[str]:
    """Markdown lines (and PNG plots in ``out``) of the meAct analysis of ``runs``."""
    meacts = [r for r in runs if r.method == "meact"]
    if not meacts:
        return []
    main = meacts[0]
    start = main.config["meact_start"]
    every = [r for r in runs if r.method == "dense"] + meacts
    pairs = [(_baseline(r, runs), r) for r in meacts if _baseline(r, runs) is not None]
    lines = _intro(main, meacts, pairs, start)
    lines += _epoch_table(main, [r for r in (_baseline(main, runs), main) if r is not None], start)
    lines += _before_after_table(every, start)
    keys = ("meact_threshold", "meact_cap", "meact_storage")
    seeds = [(d, r) for d, r in pairs if all(r.config[k] == main.config[k] for k in keys)]
    seeds.sort(key=lambda p: p[1].config["seed"])
    lines += _seeds_table(seeds, main, start)
    lines += _claims_table(seeds, start)
    lines += [
        "",
        "Forward times are whole training forwards per step (for meAct after the start: "
        "active-set selection from the stored shares, the active-only kernels, the cache), "
        "measured within each run; `benchmarks/bench_meact.py` times the layer alone.",
        "",
        "### the paper's claims (Sun et al., TKDE, meAct on MNIST)",
        "",
    ]
    lines += [f"- {c}" for c in PAPER_CLAIMS] + [""]
    same_seed = [r for r in every if r.config["seed"] == main.config["seed"]]
    names = _plots(same_seed, start, out) + _seed_plot(seeds, start, out)
    lines += [f"![{name}]({name})" for name in names] + [""]
    return lines


def _baseline(run, runs: list):
    """The dense run with the same seed and widths as ``run`` (identical until meAct
    starts), or None."""
    for r in runs:
        same = r.summary["widths"] == run.summary["widths"]
        if r.method == "dense" and same and r.config["seed"] == run.config["seed"]:
            return r
    return None


def _intro(main, meacts: list, pairs: list, start: int) -> list[str]:
    cfg = main.config
    states = sorted(
        {
            f"{r.summary['meact']['memory_bytes'] / 1e6:.1f} MB in "
            f"{r.config['meact_storage']} ({r.summary['meact']['examples']} examples)"
            for r in meacts
            if r.summary.get("meact")
        }
    )
    lines = [
        "## meAct: minimal effort activation (the extended paper's analysis)",
        "",
        f"meAct from epoch {start + 1} on (after {start} normal epochs): per example, a neuron "
        f"is active when its share of the layer's accumulated |gradient| is at least "
        f"{cfg['meact_threshold']:g}%"
        + (f", at most {cfg['meact_cap']} per layer" if cfg["meact_cap"] else "")
        + "; the others keep their value from the example's last pass and get no gradient. "
        "Each meAct run has a dense baseline with the same seed: the same initialisation and "
        "batch order, so the two are identical until meAct starts. Per-example state: "
        + ", ".join(states)
        + ".",
        "",
    ]
    if pairs:
        same = all(_before(d, start) == _before(r, start) for d, r in pairs)
        lines += [
            "Before the start, the logs of every meAct run (losses, accuracies, updates) are "
            + ("identical to those of the baseline with its seed." if same else "NOT identical."),
            "",
        ]
    return lines


def _epoch_table(main, shown: list, start: int) -> list[str]:
    """Per epoch: the first meAct run and its baseline."""
    layers = list((main.log[-1].get("active") or {}).keys())
    head = ["epoch"] + [f"{r.label} dev %" for r in shown] + [f"{r.label} update" for r in shown]
    head += [f"{main.label} active L{j + 1}" for j in range(len(layers))]
    lines = [
        "### accuracy per epoch, update and active neurons",
        "",
        "dev accuracy (%), the average absolute parameter change per iteration (mean over "
        "parameters of |theta_t - theta_(t-1)|, averaged over the epoch's steps) and meAct's "
        "mean active neurons per example in each hidden layer.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " ---: |" * len(head),
    ]
    for e in range(max(len(r.log) for r in shown)):
        recs = [r.log[e] if e < len(r.log) else {} for r in shown]
        row = [f"{e + 1}" + (" *" if e == start else "")]
        row += [
            _fmt(100 * rec["dev_" + r.metric] if rec else None, ".2f")
            for r, rec in zip(shown, recs, strict=True)
        ]
        row += [_fmt(rec.get("update"), ".3e") for rec in recs]
        row += [_fmt((recs[-1].get("active") or {}).get(name), ".1f") for name in layers]
        lines.append("| " + " | ".join(row) + " |")
    return lines + ["", "\\* the first meAct epoch.", ""]


def _before_after_table(every: list, start: int) -> list[str]:
    """Every run: before vs after the start."""
    lines = [
        "### before vs after meAct starts",
        "",
        "| run | test % (best dev epoch) | dev % last normal epoch | dev % mean after | "
        "dev % last | update before | update after | after / before | active per example "
        "(per layer, of width) | forward ms/step before | after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in every:
        ups = [e.get("update") for e in r.log]
        before, after = _mean(ups[:start]), _mean(ups[start:])
        dev = [100 * e["dev_" + r.metric] for e in r.log]
        act = [e["active"] for e in r.log[start:] if e.get("active")]
        width = r.summary["widths"]
        active = (
            ", ".join(
                f"{_mean([a[name] for a in act]):.1f} / {width[j]}" for j, name in enumerate(act[0])
            )
            if act
            else "all"
        )
        ratio = after / before if before and after is not None else None
        lines.append(
            f"| {r.label} | {r.test():.2f} ({r.summary['best_epoch']:g}) | "
            f"{_fmt(dev[start - 1] if start else None, '.2f')} | "
            f"{_fmt(_mean(dev[start:]), '.2f')} | {dev[-1]:.2f} | {_fmt(before, '.3e')} | "
            f"{_fmt(after, '.3e')} | {_fmt(ratio, '.3f')} | {active} | "
            f"{_fmt(_per_step_ms(r, 'forward', 0, start), '.2f')} | "
            f"{_fmt(_per_step_ms(r, 'forward', start, len(r.log)), '.2f')} |"
        )
    return lines


def _seeds_table(pairs: list, main, start: int) -> list[str]:
    """Per seed: the baseline against meAct at the first run's settings (pairs, by seed)."""
    if len(pairs) < 2:
        return []
    lines = [
        "",
        f"### seeds (meAct {main.config['meact_threshold']:g}% against the baseline of each seed)",
        "",
        "| seed | test % dense | test % meAct | dev % after start: dense mean | meAct mean | "
        "meAct min | meAct last | update after start: dense | meAct | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d, r in pairs:
        dev = [100 * e["dev_" + r.metric] for e in r.log[start:]]
        dev_d = [100 * e["dev_" + d.metric] for e in d.log[start:]]
        up_d = _mean([e.get("update") for e in d.log[start:]])
        up = _mean([e.get("update") for e in r.log[start:]])
        lines.append(
            f"| {r.config['seed']} | {d.test():.2f} | {r.test():.2f} | {_fmt(_mean(dev_d), '.2f')} | "
            f"{_fmt(_mean(dev), '.2f')} | {min(dev):.2f} | {dev[-1]:.2f} | {_fmt(up_d, '.2e')} | "
            f"{_fmt(up, '.2e')} | {_fmt(up / up_d if up and up_d else None, '.3f')} |"
        )
    return lines


def _claims_table(pairs: list, start: int) -> list[str]:
    """The paper's claims as paired comparisons over the seeds (meAct against the baseline of
    its seed), each with its 95% t-interval and verdict (``meprop.experiments.stats.paired``)."""
    import math

    from .stats import paired

    if not pairs:
        return []

    def sides(f):
        """(meAct's, the baselines') seed -> f(run)."""
        return (
            {r.config["seed"]: f(r) for _, r in pairs},
            {d.config["seed"]: f(d) for d, _ in pairs},
        )

    def dev_after(r):
        return _mean([100 * e["dev_" + r.metric] for e in r.log[start:]])

    def log_update_after(r):
        # log10 of the mean update after the start: meAct's below the baseline's is a
        # positive difference baseline - meAct (a factor of 10**difference)
        return math.log10(_mean([e.get("update") for e in r.log[start:]]) or math.nan)

    test = paired(*sides(lambda r: r.test()))
    dev = paired(*sides(dev_after))
    meact_up, base_up = sides(log_update_after)
    drop = paired(base_up, meact_up)

    def factor(p):
        if p.n < 2:
            return f"{10**p.mean:.1f}x (1 pair)"
        return f"{10**p.mean:.1f}x [{10**p.lo:.1f}x, {10**p.hi:.1f}x]"

    return [
        "",
        "### the paper's claims, paired over seeds",
        "",
        "meAct against the baseline of its seed, the mean over the seeds with its 95% "
        "t-interval. *holds*: the interval is above 0 (a factor above 1x); *does not hold*: "
        "below; *undecided*: it contains 0 (1x).",
        "",
        "| claim | meAct - baseline [95% interval] | seeds | verdict |",
        "| --- | --- | ---: | --- |",
        f"| meAct's test accuracy > the baseline's (points) | {test} | {test.n} | {test.verdict} |",
        f"| dev accuracy after the start > the baseline's (mean over those epochs, points) | "
        f"{dev} | {dev.n} | {dev.verdict} |",
        f"| the update per iteration after the start drops below the baseline's (baseline / "
        f"meAct, geometric mean) | {factor(drop)} | {drop.n} | {drop.verdict} |",
    ]


def _seed_plot(pairs: list, start: int, out: Path) -> list[str]:
    """Dev accuracy per epoch of the baselines (dashed) and meAct (solid) over the seeds of
    ``pairs``: mean with a min-max band."""
    if len(pairs) < 2:
        return []
    from .plots import SPREAD, band, legend_outside, over_seeds, pyplot, save, seeds_text

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    meact = f"meAct {pairs[0][1].config['meact_threshold']:g}%"
    sides = (([d for d, _ in pairs], "dense", "--"), ([r for _, r in pairs], meact, "-"))
    for i, (reps, name, ls) in enumerate(sides):
        key = "dev_" + reps[0].metric
        pts = over_seeds(reps, lambda e, key=key: 100 * e[key] if key in e else None)
        band(ax, pts, f"{name} ({seeds_text(reps)})", ls=ls, color=f"C{i}")
    ax.axvline(start + 0.5, color="grey", ls=":", label="meAct starts")
    ax.set(xlabel="epoch", ylabel="dev accuracy (%)", title=f"dense vs meAct: {SPREAD}")
    legend_outside(ax)
    save(fig, out, "meact_seeds.png")
    return ["meact_seeds.png"]


def _plots(runs: list, start: int, out: Path) -> list[str]:
    """Per epoch, the runs of one seed (named in the titles): dev accuracy, the update per
    iteration and meAct's active neurons per hidden layer."""
    from .plots import legend_entries, legend_outside, pyplot, seeds_text
    from .plots import save as save_png

    plt = pyplot()
    made = []
    seed = seeds_text(runs)

    def save(fig, ax, name, title, ylabel):
        ax.axvline(start + 0.5, color="grey", ls=":", label="meAct starts")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title} ({seed})")
        legend_outside(ax)
        save_png(fig, out, name)
        made.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        xs = [e["epoch"] for e in r.log]
        ax.plot(xs, [100 * e["dev_" + r.metric] for e in r.log], "o-", ms=3, label=r.label)
    save(fig, ax, "meact_accuracy.png", "meAct: dev accuracy per epoch", "dev accuracy (%)")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        pts = [(e["epoch"], e["update"]) for e in r.log if e.get("update")]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=r.label)
    ax.set_yscale("log")
    save(
        fig,
        ax,
        "meact_update.png",
        "average absolute parameter update per iteration",
        "mean |theta_t - theta_(t-1)|",
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    rows, styles = [], {}
    for i, r in enumerate(x for x in runs if x.method == "meact"):
        pts = [(e["epoch"], e["active"]) for e in r.log if e.get("active")]
        for j, name in enumerate(pts[0][1] if pts else []):
            ls = ("-", "--", ":", "-.")[j % 4]
            ax.plot([p[0] for p in pts], [p[1][name] for p in pts], "o", ms=3, ls=ls,
                    color=f"C{i + 1}")  # fmt: skip
            styles.setdefault(f"hidden layer {j + 1}", ls)
        rows.append((r.label, f"C{i + 1}"))
    ax.axvline(start + 0.5, color="grey", ls=":")
    handles = legend_entries(rows, list(styles.items()))
    ax.set(
        xlabel="epoch",
        ylabel="active neurons per example",
        title=f"meAct: active neurons per example ({seed})",
    )
    legend_outside(ax, handles)
    save_png(fig, out, "meact_active.png")
    made.append("meact_active.png")
    return made
