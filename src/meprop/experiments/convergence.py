"""Did a row stop improving? The slope of its dev score over its last epochs, over seeds.

A row's best epoch says little by itself: when dev moves by a tenth of a point between
epochs, a flat curve peaks at its last epoch about as often as at any other. What tells a
row that still improves from one that has flattened is the trend at the end of training:
for each seed the least-squares slope of dev against epochs over the last ``WINDOW`` epochs
(every evaluation in them), and over the seeds the mean slope with its 95% t-interval:

* still improving: the interval lies on the improving side of 0 (above for accuracies,
  below for a loss);
* no clear trend: the interval contains 0 (its width says how large a trend it leaves
  open);
* getting worse: the interval lies on the other side.

Rows shorter than ``WINDOW + 2`` epochs are left out (their last epochs are the start of
training), and so are rows with one seed (no interval).
"""

from __future__ import annotations

import statistics

from .runs import Run, replicates
from .stats import mean_interval

__all__ = ["WINDOW", "dev_slope", "convergence_section"]

WINDOW = 3  # epochs: the last 3 epochs' evaluations and the one that starts them


def _curve(run: Run) -> list[tuple[float, float]]:
    """(epoch, dev score as the tables show it) of every evaluation in the run's log."""
    key = f"dev_{run.metric}"
    scale = 1.0 if run.lower_is_better else 100.0
    return [
        (float(e["epoch"]), run.shown(scale * e[key])) for e in run.log if key in e and "epoch" in e
    ]


def dev_slope(run: Run) -> float | None:
    """Least-squares slope of dev (points, or bits per byte, per epoch) over the evaluations of
    the run's last ``WINDOW`` epochs and the one at their start; None where the run trained
    fewer than ``WINDOW + 2`` epochs or has fewer than 3 such evaluations."""
    curve = _curve(run)
    if not curve or curve[-1][0] < WINDOW + 2:
        return None
    start = curve[-1][0] - WINDOW
    pts = [(x, y) for x, y in curve if x >= start - 1e-9]
    if len(pts) < 3:
        return None
    return statistics.linear_regression(*zip(*pts, strict=True)).slope


def convergence_section(runs: list[Run]) -> list[str]:
    """The report's "Did dev stop improving?" table: per row, the epochs trained, the best
    epoch of each seed, the mean dev slope over the last epochs with its interval, and the
    verdict; empty when no row qualifies."""
    lines = []
    rows = replicates(runs)
    labels = [label for _, label in rows]
    for (group, label), reps in rows.items():
        if labels.count(label) > 1:  # (the cnn report's models: one group each)
            label = f"{group}: {label}"
        slopes = [s for r in reps if (s := dev_slope(r)) is not None]
        if len(slopes) < 2:
            continue
        p = mean_interval(slopes)
        lower = reps[0].lower_is_better
        better, worse = (p.hi < 0, p.lo > 0) if lower else (p.lo > 0, p.hi < 0)
        verdict = "still improving" if better else "getting worse" if worse else "no clear trend"
        digits = 3 if lower else 2
        epochs = sorted({int(_curve(r)[-1][0]) for r in reps})
        best = ", ".join(str(int(r.summary.get("best_epoch", 0))) for r in reps)
        lines.append(
            f"| {label} | {len(slopes)} | {'/'.join(map(str, epochs))} | {best} | "
            f"{p.mean:+.{digits}f} [{p.lo:+.{digits}f}, {p.hi:+.{digits}f}] | {verdict} |"
        )
    if not lines:
        return []
    unit = "bits per byte" if runs[0].lower_is_better else "points"
    return [
        "## Did dev stop improving?",
        "",
        f"Slope of dev ({unit} per epoch, least squares) over each seed's last {WINDOW} epochs, "
        "mean over seeds with its 95% t-interval: 'still improving' where the interval lies "
        "on the improving side of 0, 'no clear trend' where it contains 0. Best epoch: per "
        "seed.",
        "",
        "| run | seeds | epochs | best epoch | dev slope per epoch | verdict |",
        "| --- | ---: | --- | --- | --- | --- |",
        *lines,
        "",
    ]
