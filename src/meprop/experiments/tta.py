"""``meprop reproduce tta``: time to accuracy, the judge of whether meProp makes training faster.

A user trains to an accuracy, not for a fast backward. This grid trains dense and meProp
recipes side by side and reports, per recipe, the training seconds (the trainer's ``train``
clock: batches, forward, backward, optimizer, meSimp; evaluations and checkpoints excluded)
and the steps until the dev score first reaches dense's best minus 0.5, 0.2 and 0.1 point
(for a loss, bits per byte: dense's best plus 5%, 2% and 1%).

Rules that make the comparison fair and the crossing robust:

* **Side by side.** All runs of a selection are interleaved epoch by epoch in one process
  (each resumes from its checkpoint, which gives the same result as an uninterrupted run), so a
  change in the machine's load falls on every recipe alike.
* **Several seeds, paired.** Every recipe runs with the same seeds as dense (same
  initialisation and batch order); the time ratio to dense is the geometric mean of the
  per-seed ratios with a 95% t-interval on their logarithms; the final test score is paired
  the same way.
* **Robust crossings.** Dev accuracy moves by a few tenths of a point between evaluations,
  so a single lucky evaluation must not count: a run reaches a target at the first
  evaluation where the mean of the last ``WINDOW`` (3) evaluations does. The target of a seed
  is the dense run's best such running mean on that seed minus the margin (so dense reaches
  it on every seed, and each recipe is compared with dense on the same seed). Evaluations run
  ten times per epoch on MNIST, four on the parser, every 25 steps on the LM.

The rows (``tta_grid``) live in ``meprop.experiments.tta_rows``, one group per task, width
and question; ``--groups`` picks them.
``build_tta_report`` writes ``report.md`` and one plot per group.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .grids import Row, add_grid_seconds, provenance
from .stats import paired, summarize
from .tta_rows import tta_grid

__all__ = [
    "WINDOW", "MARGINS", "LOSS_MARGINS", "Metric", "tta_grid", "run_interleaved", "read_log", "crossing",
    "time_to_targets", "build_tta_report",
]  # fmt: skip

WINDOW = 3  # evaluations in the running mean that decides a crossing
MARGINS = (0.5, 0.2, 0.1)  # points below dense's best
LOSS_MARGINS = (5.0, 2.0, 1.0)  # percent above dense's best loss (the lm task's bits per byte)

# --------------------------------------------------------------------------------------------
# Running


def run_interleaved(
    rows: list[Row], out: Path, data_dir=None, echo=print, progress: bool = False
) -> list[Path]:
    """Train every row to its epochs, one epoch of each in turn (finished epochs are kept:
    an interrupted grid resumes; ``progress``: the trainer's progress display within each
    epoch). Returns the run folders."""
    from .train import run

    def quiet(*a, **k):
        pass

    origin = provenance()
    dirs = [out / "runs" / row.name for row in rows]
    epochs = max(row.config.epochs for row in rows)
    t0 = last = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for row, d in zip(rows, dirs, strict=True):
            if epoch > row.config.epochs or _epochs_done(d) >= epoch:
                continue
            d.mkdir(parents=True, exist_ok=True)
            info = {"group": row.group, "label": row.label, "seed": row.config.seed, **origin}
            (d / "row.json").write_text(json.dumps(info) + "\n")
            resume = (d / "config.json").exists()
            cfg = replace(row.config, epochs=epoch)
            run(cfg, d, data_dir=data_dir, resume=resume, progress=progress, echo=quiet)
            record = read_log(d / "log.jsonl")[-1]
            echo(
                f"[{time.perf_counter() - t0:.0f} s] {row.label} (seed {row.config.seed}): epoch "
                f"{epoch}/{row.config.epochs}, dev {_percent(record)}, train "
                f"{record['times'].get('train', 0.0):.1f} s"
            )
            now = time.perf_counter()
            add_grid_seconds(out / "grid.json", now - last)
            last = now
    return dirs


def _epochs_done(d: Path) -> int:
    """Epochs a run folder has finished (0 for none): its last checkpointed epoch record."""
    if not (d / "log.jsonl").exists() or not (d / "last.pt").exists():
        return 0
    records = read_log(d / "log.jsonl")
    return int(math.floor(records[-1]["epoch"] + 1e-9)) if records else 0


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl`` (``meprop.experiments.train.read_log``: damaged lines left out);
    where a resumed run of an older version repeated steps (it was stopped within an epoch),
    the later records replace the earlier ones."""
    from .train import read_log as records_of

    records: list[dict] = []
    for r in records_of(path)[0]:
        while records and records[-1]["step"] >= r["step"]:
            records.pop()
        records.append(r)
    return records


def _percent(record: dict) -> str:
    if "dev_accuracy" in record:
        return f"{100 * record['dev_accuracy']:.2f}%"
    key = next(k for k in record if k.startswith("dev_"))
    return f"{key[4:]} {record[key]:.4f}"


# --------------------------------------------------------------------------------------------
# Crossings


@dataclass(frozen=True)
class Metric:
    """A dev score as the targets read it: ``key`` is a log key (``dev_accuracy``, ``dev_uas``,
    ``dev_neg_bpb``); higher is better in the log. A score (accuracy, UAS) is shown in percent
    and its targets are dense's best minus ``MARGINS`` points; a negated loss (``neg_``) is
    shown as the loss and its targets are dense's best loss plus ``LOSS_MARGINS`` percent."""

    key: str

    @property
    def loss(self) -> bool:
        return self.key.startswith("dev_neg_")

    @property
    def margins(self) -> tuple[float, ...]:
        return LOSS_MARGINS if self.loss else MARGINS

    @property
    def name(self) -> str:
        return self.key[len("dev_neg_") :] if self.loss else self.key[len("dev_") :]

    @property
    def unit(self) -> str:
        return "bits per byte" if self.name == "bpb" else "" if self.loss else "%"

    def target(self, best: float, margin: float) -> float:
        """The score to reach: ``best`` (a running mean, in the log's terms) less ``margin``."""
        return best * (1 + margin / 100) if self.loss else best - margin / 100

    def shown(self, value: float) -> float:
        return -value if self.loss else 100 * value

    def margin_text(self, margin: float) -> str:
        return f"best + {margin:g}%" if self.loss else f"best - {margin:g}"


def _curve(log: list[dict], key: str) -> list[tuple[int, float, float]]:
    """(step, train seconds, running mean of the last WINDOW dev scores) per evaluation."""
    out, scores = [], []
    for r in log:
        if key not in r:
            continue
        scores.append(r[key])
        window = scores[-WINDOW:]
        out.append((r["step"], r["times"].get("train", 0.0), sum(window) / len(window)))
    return out


def crossing(log: list[dict], target: float, key: str) -> tuple[int, float] | None:
    """(step, train seconds) at the first evaluation where the running mean of the last
    ``WINDOW`` dev scores (higher is better) reaches ``target`` and at least ``WINDOW``
    evaluations have been made; None if none does."""
    for i, (step, seconds, mean) in enumerate(_curve(log, key)):
        if i + 1 >= WINDOW and mean >= target:
            return step, seconds
    return None


def time_to_targets(dense_log: list[dict], log: list[dict], key: str, margins=None):
    """Per margin: (target, dense's (step, seconds) or None, this run's, the time ratio or
    None), the target being dense's best running mean less the margin (``Metric.target``:
    points of a score, percent of a loss; default margins: the metric's)."""
    metric = Metric(key)
    best = _best_running(dense_log, key)
    out = []
    for margin in metric.margins if margins is None else margins:
        target = metric.target(best, margin)
        d, m = crossing(dense_log, target, key), crossing(log, target, key)
        ratio = m[1] / d[1] if d and m and d[1] > 0 else None
        out.append((target, d, m, ratio))
    return out


def _best_running(log: list[dict], key: str) -> float:
    points = _curve(log, key)[WINDOW - 1 :] or _curve(log, key)
    return max(p[2] for p in points)


# --------------------------------------------------------------------------------------------
# The report


def build_tta_report(paths: list[Path], out: Path) -> Path:
    """``report.md`` (and a plot per group) from the tta grid's runs in ``paths``."""
    from .report import replicates, scan_runs

    runs, notes = scan_runs(paths)
    for r in runs:  # the log as trained, resumed steps replaced
        r.log = read_log(r.path / "log.jsonl")
    groups: dict[str, list] = {}
    for (group, _), reps in replicates(runs).items():  # (a row's seeds in numeric order)
        groups.setdefault(group, []).append(sorted(reps, key=lambda r: r.seed))
    lines = [
        "# Time to accuracy",
        "",
        f"{len(runs)} runs; {_where(runs)}; grid time {_grid_hours(out)} (summed over its "
        "sittings and parallel processes).",
        "",
        "Each recipe ran with the seeds shown, interleaved epoch by epoch with the others of "
        "its group in one process and one thread (the machine's load falls on all alike). "
        f"Time is the trainer's training clock (evaluation excluded). A run reaches a target "
        f"where the mean of its last {WINDOW} dev evaluations (each group names its interval) "
        "first does; the target of a seed is the dense run's best such mean on that seed less "
        "the margin (a score: minus points; a loss: plus percent). Ratios: geometric mean over seeds of (time to target / dense's time on the "
        "same seed), with the 95% interval of the paired log-ratios; 'n/N' where only n of N "
        "seeds got there (no ratio). The steps ratio is the same for steps: it does not depend "
        "on the machine or its load (time ratio = steps ratio x the per-step time ratio). "
        "Test: the best-dev checkpoint's test score, paired against dense on the same seeds.",
    ]
    for group, rows in groups.items():
        lines += ["", *_group_section(group, rows, out)]
    if notes:
        lines += ["", "## Left out", "", *(f"- {n}" for n in notes)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _where(runs: list) -> str:
    """Where the runs were made, from their row.json (the machine, the torch thread count,
    torch, meprop and its commit): one line per distinct machine and version."""
    seen = []
    for r in runs:
        e = r.extra
        where = (
            f"{e.get('machine', 'machine unknown')}; torch {e.get('torch', '?')}; meprop "
            f"{e.get('meprop', '?')} (commit {e.get('commit') or 'unknown'})"
        )
        if where not in seen:
            seen.append(where)
    return " / ".join(seen) if seen else "no runs"


def _grid_hours(out: Path) -> str:
    p = out / "grid.json"
    if not p.exists():
        return "unknown"
    return f"{json.loads(p.read_text()).get('seconds', 0.0) / 3600:.1f} h"


def _group_section(group: str, rows: list[list], out: Path) -> list[str]:
    dense = next((reps for reps in rows if reps[0].method == "dense"), None)
    if dense is None:
        return [f"## {group}", "", "No dense run in this group: no target, no ratios."]
    key = f"dev_{dense[0].metric}"
    metric = Metric(key)
    best = summarize([_best_running(r.log, key) for r in dense])
    cfg = dense[0].config
    lines = [
        f"## {group}",
        "",
        f"{cfg['task']} ({cfg['dataset']}), hidden {'x'.join(map(str, cfg['hidden'] * cfg['layers']))}, "
        f"{cfg['optimizer']} lr {cfg['lr'] or 'default'}, batch {cfg['batch_size']}, dropout "
        f"{cfg['dropout']:g}, {_epochs(rows, dense)}, dev every {cfg['eval_every']} steps. "
        f"Dense's best running-mean dev {metric.name}: {abs(metric.shown(best.mean)):.3f} ± "
        f"{abs(metric.shown(best.sd)):.3f} {metric.unit}. Rebuild: `meprop reproduce tta "
        f"--groups {group}` (seeds {','.join(str(r.seed) for r in dense)}).",
        "",
    ]
    header = "| recipe | seeds | ms/step | " + " | ".join(
        f"to {metric.margin_text(m)}: s | time vs dense | steps vs dense" for m in metric.margins
    )
    lines += [
        header + f" | test {metric.name} | test vs dense | widths at end |",
        "|" + " --- |" * (3 + 3 * len(metric.margins) + 3),
    ]
    by_seed_dense = {r.seed: r for r in dense}
    for reps in rows:
        cells = [reps[0].label, ",".join(str(r.seed) for r in reps)]
        cells.append(f"{summarize([r.per_step_ms('train') for r in reps]).mean:.2f}")
        for margin in metric.margins:
            targets = {s: metric.target(_best_running(d.log, key), margin)
                       for s, d in by_seed_dense.items()}  # fmt: skip
            hits = {r.seed: crossing(r.log, targets[r.seed], key) for r in reps
                    if r.seed in targets}  # fmt: skip
            reached = {s: h[1] for s, h in hits.items() if h is not None}
            if not reached:
                cells += [f"never (0/{len(hits)})", "-", "-"]
                continue
            t = summarize(list(reached.values()))
            cells.append(f"{t.mean:.1f} ± {t.sd:.1f}" if t.n > 1 else f"{t.mean:.1f}")
            if len(reached) < len(hits):
                cells += [f"{len(reached)}/{len(hits)} seeds", "-"]
                continue
            dense_hits = {s: crossing(by_seed_dense[s].log, targets[s], key) for s in reached}
            cells.append(_ratio(reached, {s: h[1] for s, h in dense_hits.items()}))
            steps = {s: h[0] for s, h in hits.items()}
            cells.append(_ratio(steps, {s: h[0] for s, h in dense_hits.items()}))
        cells += _test_cells(reps, dense, metric)
        cells.append(_widths_cell(reps))
        lines.append("| " + " | ".join(cells) + " |")
    plot = _plot(group, rows, key, best.mean, out)
    if plot:
        lines += ["", f"![dev {metric.name} against training seconds]({plot})"]
    return lines


def _epochs(rows: list[list], dense_reps: list) -> str:
    """The epochs: "5 epochs", or where recipes differ "5 epochs (dense; 7: meProp ...)"."""
    dense = dense_reps[0].config["epochs"]
    other = {reps[0].label: reps[0].config["epochs"] for reps in rows
             if reps[0].config["epochs"] != dense}  # fmt: skip
    if not other:
        return f"{dense} epochs"
    return f"{dense} epochs (dense; " + "; ".join(f"{e}: {lab}" for lab, e in other.items()) + ")"


def _test_cells(reps: list, dense: list, metric: Metric) -> list[str]:
    """The test score (mean ± sd over seeds) and its difference from dense, paired by seed: in
    points for a score; for a loss, in percent of dense's loss (lower is better)."""
    digits = 3 if metric.loss else 2
    test = summarize([abs(metric.shown(r.test() / (1 if metric.loss else 100))) for r in reps])
    cells = [f"{test.mean:.{digits}f} ± {test.sd:.{digits}f}" if test.n > 1
             else f"{test.mean:.{digits}f}"]  # fmt: skip
    if reps is dense:
        return [*cells, "-"]
    if metric.loss:  # per seed 100 * (loss / dense's loss - 1)
        base = {r.seed: r.test() for r in dense}
        rel = {r.seed: 100 * (r.test() / base[r.seed] - 1) for r in reps if r.seed in base}
        p = paired(rel, dict.fromkeys(rel, 0.0))
        return [*cells, "-" if p is None else f"{p} % of dense's loss"]
    p = paired({r.seed: r.test() for r in reps}, {r.seed: r.test() for r in dense})
    return [*cells, "-" if p is None else f"{p} {p.verdict}"]


def _widths_cell(reps: list) -> str:
    """meSimp's hidden widths at the end, per layer, the mean over the seeds ("" for a run
    that keeps its widths). A run's ``final_widths`` is a list, or (the lm task) a dict from
    layer name to width."""
    per_seed = []
    for r in reps:
        widths = r.summary.get("final_widths")
        if widths:
            per_seed.append(list(widths.values()) if isinstance(widths, dict) else list(widths))
    if not per_seed:
        return ""
    means = ",".join(f"{sum(c) / len(c):.0f}" for c in zip(*per_seed, strict=True))
    return means + (f" (mean of {len(per_seed)})" if len(per_seed) > 1 else "")


def _ratio(times: dict, dense_times: dict) -> str:
    """Geometric mean of times[s] / dense_times[s] over the shared seeds, with the 95%
    interval of the paired log-ratios."""
    logs = {s: math.log(t) for s, t in times.items() if s in dense_times and t > 0}
    if not logs:
        return "-"
    p = paired(logs, {s: math.log(dense_times[s]) for s in logs})
    if p.n < 2:
        return f"{math.exp(p.mean):.2f}x (1 seed)"
    return f"{math.exp(p.mean):.2f}x [{math.exp(p.lo):.2f}, {math.exp(p.hi):.2f}]"


def _plot(group: str, rows: list[list], key: str, best: float, out: Path) -> str | None:
    """Dev score against training seconds: per recipe the mean over seeds at each evaluation
    (x: the mean seconds), a band from the lowest to the highest seed (``meprop.experiments.plots``); the
    targets dashed."""
    from . import plots

    try:
        plt = plots.pyplot()
    except ImportError:
        return None
    metric = Metric(key)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    edge = -math.inf  # the best end of the bands (highest score, lowest loss)
    ends = []  # each recipe's last point: the axis shows where every recipe ends
    for reps in rows:
        pts = plots.over_seeds(
            reps,
            lambda e: metric.shown(e[key]) if key in e else None,
            key=lambda e: e.get("step"),
            x=lambda e: e["times"].get("train", 0.0),
        )
        style = dict(color="black", lw=2) if reps[0].method == "dense" else dict(lw=1.2)
        plots.band(ax, pts, f"{reps[0].label} ({plots.seeds_text(reps)})", **style)
        edge = max([edge, *((-p.lo if metric.loss else p.hi) for p in pts)])
        if pts:
            ends.append(pts[-1].hi if metric.loss else pts[-1].lo)
    for margin, ls in zip(metric.margins, (":", "--", "-."), strict=True):
        # the targets lie close together: named in the legend, not on the data
        y = metric.shown(metric.target(best, margin))
        ax.axhline(
            y, color="grey", ls=ls, lw=0.8, label=f"target: dense's {metric.margin_text(margin)}"
        )
    shown_best = metric.shown(best)
    if metric.loss:  # lower is better: from a little below the best to 15% above it
        ax.set_ylim(-edge - 0.02 * shown_best, max([shown_best * 1.15, *(e * 1.02 for e in ends)]))
    else:
        ax.set_ylim(min([shown_best - 3.0, *(e - 0.3 for e in ends)]), edge + 0.2)
    ax.set_xlabel("training seconds (evaluation excluded), mean over seeds")
    unit = f" ({metric.unit})" if metric.unit and metric.unit != "%" else " %"
    ax.set_ylabel(f"dev {metric.name}{unit} (band: min-max over seeds)")
    ax.set_title(f"{group}: dev score against training time", fontsize=10)
    ax.grid(alpha=0.3)
    plots.legend_outside(ax)
    name = f"{group}.png"
    plots.save(fig, out, name)
    return name
