"""The plots of ``meprop report``: each one a table drawn.

Every curve, bar or point is the mean over the seeds of a row, with a band or error bars from
the lowest to the highest seed (min-max, as the tables' "test min-max" column); the seeds are
named in the legend; legends sit outside the axes; axes are in the tables' units (scores in %,
bits per byte, widths in units, ratios k/h in %). A row of one seed is drawn as that seed,
named.

The numbers a plot draws come from small functions without matplotlib (``over_seeds``,
``per_x``, ``seeds_text``), which the tests check; the drawing functions only lay them out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Point",
    "over_seeds",
    "per_x",
    "seeds_text",
    "layer_name",
    "task_plots",
    "loss_plots",
    "adaptive_plot",
    "pyplot",
    "band",
    "legend_outside",
    "legend_entries",
    "save",
    "SPREAD",
]

SPREAD = "mean over seeds, band min-max"
STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Point:
    """One drawn value: its x, the mean over ``n`` seeds, and their min (``lo``) and max
    (``hi``)."""

    x: float
    mean: float
    lo: float
    hi: float
    n: int


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _point(x: float, ys: list[float]) -> Point:
    return Point(x, _mean(ys), min(ys), max(ys), len(ys))


def over_seeds(
    reps: list,
    y: Callable[[dict], float | None],
    key: Callable[[dict], float | None] = lambda e: e.get("epoch"),
    x: Callable[[dict], float] | None = None,
) -> list[Point]:
    """A curve over the seeds ``reps`` of one row: one point per log position ``key(e)`` (the
    epoch, or the step) that every seed's log has with a value ``y(e)`` (None: no value; a
    record without its key or value, e.g. a damaged line, is left out), at x = the mean of
    ``x(e)`` over the seeds (default: the key itself).

    Example:
        >>> class R:
        ...     def __init__(self, ys):
        ...         self.log = [{"epoch": i + 1, "acc": v} for i, v in enumerate(ys)]
        >>> [(p.x, p.mean, p.lo, p.hi) for p in over_seeds([R([1, 4]), R([3, 2])],
        ...                                                 lambda e: e["acc"])]
        [(1, 2.0, 1, 3), (2, 3.0, 2, 4)]
    """
    logs = [{key(e): e for e in r.log if key(e) is not None and y(e) is not None} for r in reps]
    shared = set(logs[0]).intersection(*logs[1:]) if logs else set()
    out = []
    for k in sorted(shared):
        records = [log[k] for log in logs]
        xs = [x(e) for e in records] if x else [k]
        out.append(_point(_mean(xs) if x else k, [y(e) for e in records]))
    return out


def per_x(pairs: Iterable[tuple[float, float]]) -> list[Point]:
    """(x, value) pairs, one per run, as one point per x: mean, min and max of its values.

    Example:
        >>> [(p.x, p.mean, p.n) for p in per_x([(4, 97.0), (8, 98.0), (4, 98.0)])]
        [(4, 97.5, 2), (8, 98.0, 1)]
    """
    by: dict[float, list[float]] = {}
    for x, v in pairs:
        by.setdefault(x, []).append(v)
    return [_point(x, vs) for x, vs in sorted(by.items())]


def seeds_text(reps: list) -> str:
    """``seed 2``, ``seeds 1-3`` or ``seeds 1, 3``: the seeds a row's mark stands for."""
    seeds = sorted({r.seed for r in reps})
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def layer_name(key: str, position: int) -> str:
    """A logged layer key as a reader names it: module indices of an MLP (``"0"``, ``"3"``)
    by position (``hidden layer 1``), an LSTM's ``lstm.l0_reverse`` as ``LSTM layer 1
    backward``, a transformer's ``blocks.0.mlp.fc`` as ``block 1 mlp.fc``."""
    if key.isdigit():
        return f"hidden layer {position + 1}"
    if re.fullmatch(r"mlp\.\d+", key):  # the parser's MLP over the LSTM states
        return f"MLP hidden layer {position + 1}"
    m = re.fullmatch(r"lstm\.l(\d+)(_reverse)?", key)
    if m:
        return f"LSTM layer {int(m[1]) + 1} " + ("backward" if m[2] else "forward")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    return f"block {int(m[1]) + 1} {m[2]}" if m else key


# --- drawing -------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, pts: list[Point], label: str | None, **kw):
    """The mean as a line, min-max as a band where a point has several seeds."""
    line = ax.plot([p.x for p in pts], [p.mean for p in pts], label=label, **kw)[0]
    if any(p.n > 1 for p in pts):
        ax.fill_between(
            [p.x for p in pts],
            [p.lo for p in pts],
            [p.hi for p in pts],
            color=line.get_color(),
            alpha=0.15,
            lw=0,
        )
    return line


def legend_outside(ax, handles=None, **kw) -> None:
    """The legend right of the axes, off the data."""
    kw = dict(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False, **kw)
    if handles is None:
        ax.legend(**kw)
    else:
        ax.legend(handles=handles, **kw)


def legend_entries(rows: list[tuple[str, str]], styles: list[tuple[str, str]]):
    """Legend entries: one per row (its colour, a solid line), then one per line style (grey):
    a row with several layers or splits keeps one entry."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=label) for label, c in rows]
    if len(styles) > 1:
        handles += [Line2D([], [], color="grey", ls=ls, label=label) for label, ls in styles]
    return handles


def _layered(ax, rows: list[list], curves: Callable[[list], dict], **kw) -> list:
    """Draw each row's curves per layer (``curves(reps)``: layer name -> points): a colour per
    row and a line style per layer; a single row, a colour per layer. Returns the legend
    entries: one per row, then one per layer (none without curves)."""
    from matplotlib.lines import Line2D

    drawn = [(reps, c) for reps in rows if (c := curves(reps))]
    by_layer = len(drawn) == 1
    handles, layers = [], {}
    for i, (reps, layer_curves) in enumerate(drawn):
        for j, (layer, pts) in enumerate(layer_curves.items()):
            colour, ls = (f"C{j % 10}", STYLES[j // 10 % 4]) if by_layer else (f"C{i % 10}", STYLES[j % 4])  # fmt: skip
            band(ax, pts, None, color=colour, ls=ls, **kw)
            layers.setdefault(layer, (colour if by_layer else "grey", ls))
        colour = "none" if by_layer else f"C{i % 10}"  # one row: its name heads the layers
        handles.append(Line2D([], [], color=colour, label=_label(reps)))
    if len(layers) > 1 or by_layer:
        handles += [Line2D([], [], color=c, ls=ls, label=name) for name, (c, ls) in layers.items()]
    return handles


def save(fig, out: Path, name: str) -> None:
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def _label(reps: list) -> str:
    return f"{reps[0].label} ({seeds_text(reps)})"


# --- the plots of a task with scores in % ----------------------------------------------------


def ratio_points(sweep: list, mode: str) -> list[Point]:
    """Test score against the backprop ratio k/h (%) of one mode's meProp runs: one point per
    k, the mean over its seeds."""
    return per_x(
        (100 * r.config["k"] / max(r.summary["widths"]), r.test())
        for r in sweep
        if r.config["mode"] == mode
    )


def _ratio_plot(sweep: list, dense: list, metric: str, out: Path) -> str:
    """``accuracy_vs_ratio.png``: per mode, the mean test score per k with min-max error bars
    on a log axis labelled in %; dense as its mean with a min-max band."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = []
    for i, mode in enumerate(("per_example", "unified")):
        pts = ratio_points(sweep, mode)
        if not pts:
            continue
        shift = 1 + 0.03 * (2 * i - 1)  # side by side, so the bars do not hide each other
        reps = [r for r in sweep if r.config["mode"] == mode]
        ax.errorbar(
            [p.x * shift for p in pts],
            [p.mean for p in pts],
            yerr=[[p.mean - p.lo for p in pts], [p.hi - p.mean for p in pts]],
            fmt="o-",
            capsize=3,
            color=f"C{i}",
            label=f"meProp {mode} ({seeds_text(reps)})",
        )
        xs += [p.x for p in pts]
    if dense:
        (d,) = per_x((0, r.test()) for r in dense)
        ax.axhline(d.mean, color="k", ls="--", label=f"dense ({seeds_text(dense)})")
        if d.n > 1:
            ax.axhspan(d.lo, d.hi, color="k", alpha=0.1, lw=0)
    ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 100) if min(xs) / 1.5 <= t <= max(xs) * 1.5]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(
        xlabel="backprop ratio k/h (%), log scale",
        ylabel=f"test {metric} (%)",
        title=f"test {metric} vs backprop ratio: mean over seeds, bars min-max",
    )
    legend_outside(ax)
    save(fig, out, "accuracy_vs_ratio.png")
    return "accuracy_vs_ratio.png"


def _dev_curves(rows: list[list], key: str, title: str, name: str, out: Path) -> str:
    """Dev score per epoch of each row: mean over its seeds with a min-max band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for reps in rows:
        band(ax, over_seeds(reps, lambda e: 100 * e[key] if key in e else None), _label(reps))
    ax.set(xlabel="epoch", ylabel=key.replace("_", " ") + " (%)", title=f"{title}: {SPREAD}")
    legend_outside(ax)
    save(fig, out, name)
    return name


def _learning_curves(rows: list[list], metric: str, out: Path) -> str:
    """Train (solid) and dev (dashed) score per epoch of each row, mean with a min-max band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = []
    for i, reps in enumerate(rows):
        for split, ls in (("train", "-"), ("dev", "--")):
            k = f"{split}_{metric}"
            pts = over_seeds(reps, lambda e, k=k: 100 * e[k] if k in e else None)
            band(ax, pts, None, color=f"C{i}", ls=ls)
        colours.append((_label(reps), f"C{i}"))
    ax.set(xlabel="epoch", ylabel=f"{metric} (%)", title=f"learning curves: train vs dev, {SPREAD}")
    legend_outside(ax, legend_entries(colours, [("train", "-"), ("dev", "--")]))
    save(fig, out, "learning_curves.png")
    return "learning_curves.png"


def width_curves(reps: list, key: Callable[[dict], float]) -> dict[str, list[Point]]:
    """meSimp's logged widths of one row, per layer (named by position): mean over seeds."""
    logged = [e for e in reps[0].log if e.get("widths")]
    layers = list(logged[0]["widths"]) if logged else []
    return {
        layer_name(layer, j): over_seeds(
            reps, lambda e, layer=layer: (e.get("widths") or {}).get(layer), key=key
        )
        for j, layer in enumerate(layers)
    }


def _widths_plot(rows: list[list], out: Path, *, by_step: bool) -> str | None:
    """``mesimp_widths.png``: each meSimp row's widths per layer (line style) over training,
    mean over seeds with a min-max band; one legend entry per row."""
    key = (lambda e: e.get("step")) if by_step else (lambda e: e.get("epoch"))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    handles = _layered(ax, rows, lambda reps: width_curves(reps, key))
    if not handles:
        plt.close(fig)
        return None
    ax.set(
        xlabel="training steps" if by_step else "epoch",
        ylabel="width (units)",
        title=f"meSimp: widths over training, {SPREAD}",
    )
    legend_outside(ax, handles)
    save(fig, out, "mesimp_widths.png")
    return "mesimp_widths.png"


def _size_plot(rows: list[list], metric: str, out: Path) -> str:
    """``mesimp_vs_size.png``: one mark per row, its mean test score with min-max error bars.
    Points, not bars: the axis spans the scores (said in its label), and a bar cut off above 0
    would draw differences out of proportion."""
    plt = pyplot()
    summaries = [(reps, _point(0, [r.test() for r in reps])) for reps in rows]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    for y, (_, p) in zip(ys, summaries, strict=True):
        ax.errorbar(
            p.mean, y, xerr=[[p.mean - p.lo], [p.hi - p.mean]], fmt="o", capsize=3, color="C0"
        )
    lo = min(p.lo for _, p in summaries)
    hi = max(p.hi for _, p in summaries)
    pad = max(0.1, 0.15 * (hi - lo))
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks(ys, [_label(reps) for reps, _ in summaries])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    ax.set(
        xlabel=f"test {metric} (%), axis {lo - pad:.2f} to {hi + pad:.2f} (not from 0)",
        title="meSimp vs dense at its size: mean over seeds, bars min-max",
    )
    save(fig, out, "mesimp_vs_size.png")
    return "mesimp_vs_size.png"


def _comparable(main) -> Callable:
    """Whether a run compares with ``main`` (the main dense run): fixed k (the adaptive rows
    have their own plot), Adam, the same depth and dropout (other groups vary them)."""
    depth, dropout = len(main.summary["widths"]), main.config["dropout"]
    return lambda r: (
        not r.config.get("adaptive")
        and r.config["optimizer"] == "adam"
        and len(r.summary["widths"]) == depth
        and r.config["dropout"] == dropout
    )


def _control_plots(runs: list, rows: list[list], base, comparable, out: Path) -> list[str]:
    """Dev curves of dense and meProp beside random-k and beside the k-dimensional net (each
    only with its control), and the learning curves."""
    metric = runs[0].metric

    def find(method, k=None, mode=None) -> list | None:
        """The first row of ``method`` (and k, mode) comparable with the main one."""
        for reps in rows:
            c = reps[0].config
            if (
                c["method"] == method
                and comparable(reps[0])
                and (k is None or c["k"] == k)
                and (mode is None or c["mode"] == mode)
            ):
                return reps
        return None

    # k of the controls (the random-k run), else of the main meProp runs: 20 for MNIST
    ks = [r.config["k"] for r in runs if r.method == "random"]
    ks += [r.config["k"] for r in runs if r.method == "meprop" and r.group == "main"]
    k = ks[0] if ks else 20
    uni, pe = find("meprop", k, "unified"), find("meprop", k, "per_example")
    made = []
    for name, title, control in (
        ("topk_vs_random.png", f"top-k vs random-k (k={k})", find("random", k)),
        ("meprop_vs_kdim.png", f"meProp vs a k-dimensional network (k={k})", find("kdim", k)),
    ):
        if control is not None:  # no plot without the control its title names
            picks = [r for r in (base, pe, uni, control) if r]
            made.append(_dev_curves(picks, f"dev_{metric}", title, name, out))
    lc = [r for r in (base, uni, pe) if r]
    if lc:
        made.append(_learning_curves(lc, metric, out))
    return made


def task_plots(runs: list, rows: list[list], out: Path) -> list[str]:
    """The plots of a report: its ``runs`` and their ``rows`` (each the runs of one row over
    its seeds, ``meprop.experiments.report.replicates``). Returns the names of the PNGs written in
    ``out``."""
    if runs[0].lower_is_better:
        return loss_plots(runs, rows, out)
    made = []
    metric = runs[0].metric
    dense = [reps for reps in rows if reps[0].method == "dense" and reps[0].group in ("main", "runs")]  # fmt: skip
    base = dense[0] if dense else None
    comparable = _comparable(base[0] if base else runs[0])
    # (k/h is a ratio of the MLP's widths; a CNN's k counts channels of layers of other widths)
    sweep = [r for r in runs if r.method == "meprop" and comparable(r)
             and r.config.get("model", "mlp") == "mlp"]  # fmt: skip
    # a curve needs two ratios at least: one k is a point, already in the tables
    if len({(r.config["k"], r.config["mode"]) for r in sweep}) > len(
        {r.config["mode"] for r in sweep}
    ):
        made.append(_ratio_plot(sweep, base or [], metric, out))
    made += _control_plots(runs, rows, base, comparable, out)
    simp = [reps for reps in rows if reps[0].method == "mesimp"]
    if simp:
        name = _widths_plot(simp, out, by_step=False)
        made += [name] if name else []
        sized = [reps for reps in rows if reps[0].path.name.startswith("dense-size-of-")]
        made.append(_size_plot(([base] if base else []) + simp + sized, metric, out))
    return made


# --- a task whose score is a negated loss (lm) -----------------------------------------------


def loss_plots(runs: list, rows: list[list], out: Path) -> list[str]:
    """Dev loss against training steps and against training seconds (the loop's wall-clock,
    evaluations excluded, mean over the seeds at each evaluation), one curve per row (mean
    over its seeds, min-max band; the one-seed tuning rows are in their table); meSimp's
    widths against steps."""
    plt = pyplot()
    first = runs[0]
    key, shown = f"dev_{first.metric}", first.shown_metric
    rows = [reps for reps in rows if reps[0].group != "tuning"]
    made = []
    for name, xlabel, x in (
        (f"dev_{shown}_vs_steps.png", "training steps", None),
        (
            f"dev_{shown}_vs_seconds.png",
            "training seconds (wall-clock, evaluations excluded; mean over seeds)",
            lambda e: (e.get("times") or {}).get("train", 0.0),
        ),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, reps in enumerate(rows):
            pts = over_seeds(
                reps, lambda e: -e[key] if key in e else None, key=lambda e: e.get("step"), x=x
            )
            band(ax, pts, _label(reps), color=f"C{i % 10}", ls=STYLES[i // 10 % 4])
        ax.set(
            xlabel=xlabel,
            ylabel=f"dev {shown} (lower is better)",
            title=f"dev {shown}: {SPREAD}",
        )
        legend_outside(ax)
        save(fig, out, name)
        made.append(name)
    simp = [reps for reps in rows if reps[0].method == "mesimp"]
    if simp:
        name = _widths_plot(simp, out, by_step=True)
        made += [name] if name else []
    return made


# --- adaptive k ------------------------------------------------------------------------------


def adaptive_plot(adaptive: list[list], bounds: list[tuple[float, int]], out: Path) -> str | None:
    """``adaptive_k.png``: k against training steps per adaptive row (colour) and layer (line
    style), mean over the row's seeds with a min-max band; the rows' ``bounds`` ((mean bound
    over the layers, k) each) dashed."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def curves(reps: list) -> dict[str, list[Point]]:
        layers = next((list(e["mean_k"]) for e in reps[0].log if e.get("mean_k")), [])
        return {
            layer_name(layer, j): over_seeds(
                reps,
                lambda e, layer=layer: (e.get("mean_k") or {}).get(layer),
                key=lambda e: e.get("step"),
            )
            for j, layer in enumerate(layers)
        }

    handles = _layered(ax, adaptive, curves, marker="o", ms=3)
    if not handles:
        plt.close(fig)
        return None
    from matplotlib.lines import Line2D

    for bound, k in bounds:
        ax.axhline(bound, color="k", ls="--", lw=1)
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label=f"bound k={k} (the fixed k)"))
    ax.set(
        xlabel="training steps",
        ylabel="mean k over the epoch",
        yscale="log",
        title=f"adaptive k over training: {SPREAD}",
    )
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    legend_outside(ax, handles)
    save(fig, out, "adaptive_k.png")
    return "adaptive_k.png"
