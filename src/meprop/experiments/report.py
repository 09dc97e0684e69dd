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
from dataclasses import dataclass, field
from pathlib import Path

from .grids import PAPER
from .stats import Paired, paired, summarize

__all__ = [
    "Run",
    "load_runs",
    "replicates",
    "claims",
    "adaptive_claims",
    "adaptive_section",
    "build_report",
]


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    log: list[dict]
    group: str
    label: str
    extra: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def metric(self) -> str:
        """The score that selects the best epoch (accuracy, uas, ...)."""
        return self.summary.get("metric", "accuracy")

    @property
    def lower_is_better(self) -> bool:
        """The metric is a negated loss (``neg_bpb``): shown as the loss, lower is better."""
        return self.metric.startswith("neg_")

    @property
    def shown_metric(self) -> str:
        """What the tables show: ``bpb`` for ``neg_bpb``, else the metric (in %)."""
        return self.metric.removeprefix("neg_")

    def shown(self, score: float) -> float:
        """A score of ``test()`` / ``dev()`` as the tables show it (the loss for a negated
        one)."""
        return -score if self.lower_is_better else score

    def per_step_ms(self, key: str) -> float:
        return 1000 * self.summary["times"].get(key, 0.0) / max(1, self.summary["steps"])

    @property
    def seed(self) -> int:
        return int(self.extra.get("seed", self.config.get("seed", 1)))

    def _score(self, key: str) -> float:
        value = self.summary[key]
        return value if self.lower_is_better else 100 * value

    def test(self) -> float:
        """The test score, higher is better: a percentage, or the negated loss as it is."""
        return self._score(f"test_{self.metric}")

    def dev(self) -> float:
        return self._score(f"dev_{self.metric}")


def _label(cfg: dict) -> str:
    if cfg["method"] == "dense":
        return f"dense {cfg['hidden']}"
    return f"{cfg['method']} {cfg['mode']} k={cfg['k']}"


class ReportError(ValueError):
    """A report that cannot be made as asked (no runs, an unwritable folder): one line."""

    user_mistake = True


def _read_json(path: Path, kind: type, what: str):
    """The JSON value of ``path``, of type ``kind``; ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no {path.name}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds {type(value).__name__}, not {what}")
    return value


def _check_summary(path: Path, summary: dict) -> None:
    metric = summary.get("metric", "accuracy")
    for key, kind in (("times", dict), ("steps", int), ("widths", list),
                      (f"test_{metric}", float | int), (f"dev_{metric}", float | int)):  # fmt: skip
        if not isinstance(summary.get(key), kind) or isinstance(summary.get(key), bool):
            raise ValueError(f"{path} has no valid {key!r} (damaged, or not meprop's)")


def _load_run(d: Path) -> tuple[Run, list[str]]:
    """One run folder's Run and notes on its log's damaged lines; ValueError naming the file
    where it cannot be used (no summary.json: not finished; a damaged file)."""
    from .train import read_log

    cfg = _read_json(d / "config.json", dict, "a config (a JSON object)")
    summary = _read_json(d / "summary.json", dict, "a summary (a JSON object)")
    _check_summary(d / "summary.json", summary)
    for key in ("method", "task"):
        if not isinstance(cfg.get(key), str):
            raise ValueError(f"{d / 'config.json'} has no valid {key!r}")
    row = {}
    if (d / "row.json").exists():
        row = _read_json(d / "row.json", dict, "a row (a JSON object)")
    log, notes = read_log(d / "log.jsonl")
    run = Run(d, cfg, summary, log, row.get("group", "runs"), row.get("label", _label(cfg)), row)
    return run, notes


def scan_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The finished runs in ``paths`` (run folders, or results folders holding ``runs/*``), and
    a note on each folder left out (not finished: no summary.json; a damaged file), each
    repeated seed of a row (pooled once) and each damaged log line."""
    dirs: list[Path] = []
    for p in map(Path, paths):
        if (p / "runs").is_dir() and not (p / "config.json").exists():
            dirs += sorted(d for d in (p / "runs").iterdir() if d.is_dir())
        elif (p / "summary.json").exists() or (p / "config.json").exists():
            dirs.append(p)
        else:
            raise FileNotFoundError(
                f"{p} is neither a finished run (summary.json), an unfinished one "
                "(config.json), nor a results folder (runs/*/summary.json)"
            )
    runs, notes = [], []
    for d in dirs:
        try:
            run, log_notes = _load_run(d)
        except ValueError as e:
            label = ""
            try:
                row = json.loads((d / "row.json").read_text())
                label = f" (row {row['label']!r}, seed {row.get('seed', '?')})"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            why = "not finished: no summary.json" if str(e) == "no summary.json" else str(e)
            notes.append(f"{d}{label}: left out, {why}")
            continue
        runs.append(run)
        notes += log_notes
    runs, more = _distinct_rows(runs)
    return runs, notes + more


def load_runs(paths: list[Path]) -> list[Run]:
    """Runs from run directories, or from results folders holding ``runs/*`` (``scan_runs``
    without its notes)."""
    return scan_runs(paths)[0]


#: The setting that tells apart the runs of one row (a dense net trained at a meSimp run's final
#: widths has the widths of its seed's run besides: ``_settings_key``).
_PER_SEED = {"seed"}


def _settings_key(run: Run) -> str:
    """A run's settings but those that differ between the seeds of one row."""
    ignore = _PER_SEED | (
        {"hidden", "layers"} if run.path.name.startswith("dense-size-of-") else set()
    )
    return json.dumps(
        {k: v for k, v in _full_config(run).items() if k not in ignore}, sort_keys=True
    )


def _full_config(run: Run) -> dict:
    """The run's config with the fields that its version did not write yet at their defaults
    (as the trainer reads it), so that runs of older and newer versions compare."""
    from .train import ConfigError, TrainConfig

    try:
        return TrainConfig.from_dict(dict(run.config)).to_dict()
    except (ConfigError, TypeError):
        return run.config


def _distinct_rows(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """Runs of one label but different settings get labels that name what differs (never
    pooled); a seed that a row holds twice is kept once (the first folder) and noted."""
    variants: dict[tuple[str, str], dict[str, Run]] = {}
    for r in runs:
        variants.setdefault((r.group, r.label), {}).setdefault(_settings_key(r), r)
    for (_, label), by_key in variants.items():
        if len(by_key) < 2:
            continue
        configs = [json.loads(k) for k in by_key]
        differ = sorted(
            {k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)}
        )
        for key, first in by_key.items():
            c = json.loads(key)
            named = ", ".join(f"{k} {json.dumps(c.get(k))}" for k in differ)
            for r in runs:
                if r.label == label and r.group == first.group and _settings_key(r) == key:
                    r.label = f"{label} ({named})"
    kept, notes, seen = [], [], {}
    for r in runs:
        where = seen.setdefault((r.group, r.label, r.seed), r.path)
        if where != r.path:
            notes.append(
                f"{r.path}: left out, seed {r.seed} of the row {r.label!r} again (also in "
                f"{where}): a seed is pooled once"
            )
            continue
        kept.append(r)
    return kept, notes


def replicates(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs of the same row (group and label; ``scan_runs`` gives runs of different settings
    different labels) over seeds, in order of first appearance."""
    out: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        out.setdefault((r.group, r.label), []).append(r)
    return out


def _reference(run: Run, runs: list[Run]) -> Run | None:
    """The dense run this run's times are compared with (same optimizer, depth, dropout)."""

    def key(r: Run):
        c = r.config
        return (
            c["task"], c["optimizer"], len(r.summary["widths"]), c["dropout"], c["dataset"],
            c.get("batch_size"), c.get("train_limit"), c.get("epochs"), c.get("eval_every"),
        )  # fmt: skip

    # the full-size dense runs (not the dense nets trained at meSimp's widths)
    dense = [r for r in runs if r.method == "dense" and r.config["task"] == run.config["task"]]
    widest = max((max(r.summary["widths"]) for r in dense), default=0)
    dense = [r for r in dense if max(r.summary["widths"]) == widest]
    # (a dense row is compared with the main one at any lr: the tuning rows' lr is their point)
    same = [
        r
        for r in dense
        if key(r) == key(run) and (run.method == "dense" or r.config["lr"] == run.config["lr"])
    ]
    return (same or [None])[0]  # none measured alike: no speedup shown


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
        ref = _reference(reps[0], all_runs)
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
            f"| {label} | {len(reps)} | {hidden} | {_fmt(dev, digits)} | {_fmt(test, digits)} | "
            f"{span} | {ms('hidden_backward'):.2f} | {ratio('hidden_backward')} | "
            f"{ms('linear_backward'):.2f} | {ratio('linear_backward')} | "
            f"{ms('backward'):.2f} | {ratio('backward')} | {ms('forward'):.2f} |"
            + (f" {ms('train'):.1f} | {ratio('train')} |" if whole else "")
        )
    return lines


def _fmt(s, digits: int) -> str:
    """A ``Summary`` with ``digits`` decimals (bits per byte need three)."""
    return f"{s.mean:.{digits}f}" + (f" ± {s.sd:.{digits}f}" if s.n > 1 else "")


def claims(runs: list[Run], notes: list[str] | None = None) -> list[tuple[str, Paired, str]]:
    """The paper's claims, each a paired comparison on the seeds both sides share: (claim,
    the test-score difference a - b with its 95% interval, which runs).

    A claim whose side would take runs of several rows is not made (a note in ``notes``).
    Scores are higher-is-better (``Run.test``): for a negated loss (``neg_bpb``) the difference
    a - b is b's loss minus a's, positive where a's loss is lower; the claims then say "at
    least as good as" and "better than" rather than ">=" and ">"."""
    lower = bool(runs) and runs[0].lower_is_better
    ge, gt = ("at least as good as", "better than") if lower else (">=", ">")
    notes = [] if notes is None else notes

    def scores(pred) -> dict[int, float] | list[str]:
        """The test scores by seed of the one row whose runs ``pred`` picks; the rows' labels
        where it picks several (a claim never pools two rows)."""
        picked = [r for r in runs if pred(r)]
        labels = sorted({r.label for r in picked})
        if len(labels) > 1:
            return labels
        return {r.seed: r.test() for r in picked}

    def main_opt(r):
        return r.config["optimizer"] == "adam" and r.group in ("main", "control", "mesimp")

    dense = scores(lambda r: r.method == "dense" and r.group == "main")
    out = []

    def add(claim, a, b, what):
        several = [side for side in (a, b) if isinstance(side, list)]
        if several:
            notes.append(
                f"{claim}: not made, several rows match one side ({'; '.join(several[0])})"
            )
            return
        p = paired(a, b)
        if p is not None:
            out.append((claim, p, what))

    ks = sorted({r.config["k"] for r in runs if r.method == "meprop" and r.group == "main"})
    for k in ks:
        for mode in ("per_example", "unified"):
            for fc in (False, True):  # lm: meProp on mlp.fc only (TrainConfig.fc_only)
                mp = scores(
                    lambda r, k=k, mode=mode, fc=fc: (
                        r.method == "meprop"
                        and r.group == "main"
                        and r.config["k"] == k
                        and r.config["mode"] == mode
                        and bool(r.config.get("fc_only")) == fc
                    )
                )
                name = f"meProp {mode} k={k}" + (" on mlp.fc only" if fc else "")
                add(f"{name} {ge} dense", mp, dense, f"{name} - dense")
        top = scores(
            lambda r, k=k: (
                r.method == "meprop"
                and r.group == "main"
                and r.config["k"] == k
                and r.config["mode"] == "per_example"
                and not r.config.get("fc_only")
            )
        )
        rand = scores(lambda r, k=k: r.method == "random" and r.config["k"] == k and main_opt(r))
        add(f"top-k {gt} random-k (k={k})", top, rand, f"meProp per_example k={k} - random-k")
        uni = scores(lambda r, k=k: r.method == "meprop" and r.group == "main" and r.config["k"] == k
                     and r.config["mode"] == "unified" and not r.config.get("fc_only"))  # fmt: skip
        add(f"unified top-k {gt} random-k (k={k})", uni, rand, f"meProp unified k={k} - random-k")
        kdim = scores(lambda r, k=k: r.method == "kdim" and r.config["k"] == k and main_opt(r))
        add(
            f"meProp {gt} a dense net of width k={k}",
            top,
            kdim,
            f"meProp per_example k={k} - k-dim",
        )
    # Symmetric per-example selection (docs/per_example.md): against dense and per_example.
    for k in sorted({r.config["k"] for r in runs if r.config.get("mode") == "symmetric"}):
        sym = scores(lambda r, k=k: r.config.get("mode") == "symmetric" and r.config["k"] == k
                     and r.method == "meprop")  # fmt: skip
        pe = scores(lambda r, k=k: r.method == "meprop" and r.group == "main"
                    and r.config["mode"] == "per_example" and r.config["k"] == k)  # fmt: skip
        add(f"meProp symmetric k={k} {ge} dense", sym, dense, f"meProp symmetric k={k} - dense")
        add(f"meProp symmetric k={k} {gt} per_example k={k}", sym, pe,
            f"meProp symmetric k={k} - per_example k={k}")  # fmt: skip
    # The k sweep's rows with several seeds (the paper's MNIST claim is at k=80): against dense.
    swept: dict[tuple[int, str], list[Run]] = {}
    for r in runs:
        if r.method == "meprop" and r.group == "ratio" and not r.config.get("adaptive"):
            swept.setdefault((r.config["k"], r.config["mode"]), []).append(r)
    for (k, mode), picked in sorted(swept.items()):
        mp = scores(lambda r, picked=picked: r in picked)
        if len(mp) >= 2 and k not in ks:
            add(f"meProp {mode} k={k} {ge} dense", mp, dense, f"meProp {mode} k={k} - dense")
    dense_runs = [r for r in runs if r.method == "dense" and r.group == "main"]
    for (_group, label), reps in replicates(
        [r for r in runs if r.method == "mesimp" and r.config["optimizer"] == "adam"]
    ).items():
        simp = {r.seed: r.test() for r in reps}
        # the share of the dense width (without a dense run: of the meSimp run's own start)
        full = max(max(r.summary["widths"]) for r in [*dense_runs, *reps]) or 1
        share = [
            100 * sum(r.summary["final_widths"].values()) / (full * len(r.summary["final_widths"]))
            for r in reps
            if r.summary.get("final_widths")
        ]
        pct = f"{sum(share) / len(share):.0f}%" if share else "?"
        # the scored checkpoint's widths (best dev), where they differ from the final ones
        best = [100 * sum(r.summary["best_widths"]) / (full * len(r.summary["best_widths"]))
                for r in reps if r.summary.get("best_widths")]  # fmt: skip
        if share and len(best) == len(reps) and f"{sum(best) / len(best):.0f}%" != pct:
            pct = f"{sum(best) / len(best):.0f}% (the scored checkpoints; {pct} at the end)"
        add(f"{label} {ge} dense, at {pct} of the width", simp, dense, f"{label} - dense")
        names = {r.path.name for r in reps}
        sized = {
            r.seed: r.test()
            for r in runs
            if r.path.name.startswith("dense-size-of-")
            and r.path.name.removeprefix("dense-size-of-") in names
        }
        add(
            f"{label} {gt} a dense net trained at its final widths",
            simp,
            sized,
            f"{label} - dense at its widths",
        )
    out += _setting_claims(runs, ge, gt)
    return out


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


def _claims_table(runs: list[Run]) -> list[str]:
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
    lines += [f"| {c} | {_fmt_paired(p, digits)} | {p.n} | {p.verdict} |" for c, p, _ in rows]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return lines + [""]


def _fmt_paired(p: Paired, digits: int) -> str:
    if p.n < 2:
        return f"{p.mean:+.{digits}f} (1 pair)"
    return f"{p.mean:+.{digits}f} [{p.lo:+.{digits}f}, {p.hi:+.{digits}f}]"


def _plots(runs: list[Run], out: Path) -> list[str]:
    """The report's plots (``meprop.experiments.plots``): names of the PNGs written in ``out``."""
    from .plots import task_plots

    return task_plots(runs, list(replicates(runs).values()), out)


# --- adaptive k ---------------------------------------------------------------------------


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
    for reps in table:
        r0 = reps[0]
        test = summarize([r.shown(r.test()) for r in reps])
        ks = [_mean_ks(r) for r in reps]
        over, last = _mean(k for k, _ in ks), _mean(k for _, k in ks)
        bound = _bound(r0)
        cut = 100 * (1 - last / bound)
        linear = _mean(r.per_step_ms("linear_backward") for r in reps)
        hits = [_crossing(r, target) for r in reps]
        if all(hits):
            steps = f"{_mean(h[0] for h in hits):.0f}"
            sec = _mean(h[1] for h in hits)
            secs = f"{sec:.1f}" if sec >= 10 else f"{sec:.2f}"
        else:
            steps = secs = "-"
        commits = ", ".join(dict.fromkeys(r.extra.get("commit", "?") for r in reps))
        lines.append(
            f"| {r0.label} | {r0.group} | {_rule(r0)} | {r0.config['k']} | "
            f"{_fmt(test, digits)} ({test.n}) | {over:.1f} | {last:.1f} | {cut:.1f}% | "
            f"{linear:.3f} | {steps} | {secs} | {commits} |"
        )
    lines.append("")
    rows = adaptive_claims(runs)
    if rows:
        column = f"difference ({shown} of fixed - adaptive)" if lower else "difference (points)"
        lines += [
            "Adaptive k against fixed k, paired over seeds (test score, same seeds: the mean "
            "difference adaptive - fixed with its 95% t-interval; *holds*: above 0, *does not "
            "hold*: below 0, *undecided*: contains 0):",
            "",
            f"| claim | {column} [95% interval] | seeds | verdict |",
            "| --- | --- | ---: | --- |",
        ]
        lines += [f"| {c} | {_fmt_paired(p, digits)} | {p.n} | {p.verdict} |" for c, p, _ in rows]
        lines.append("")
    name = _adaptive_plot([reps for adaptive, _ in groups for reps in adaptive], out)
    if name:
        lines += [f"![{name}]({name})", ""]
    return lines


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
    "tuning": "dense at other learning rates and dropouts (one seed each): the shared "
    "settings chosen on dev",
    "runs": "runs",
}


def _settings(runs: list[Run]) -> list[str]:
    """The shared settings, from the first dense run (else the first run)."""
    r = next((r for r in runs if r.method == "dense"), runs[0])
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
    first = runs[0].summary
    origin = runs[0].extra
    seeds = sorted({r.seed for r in runs})
    grid = {}  # in the results folder: given, or above the runs/NAME folders given
    for folder in {f for p in map(Path, paths) for f in (p, p.parent.parent)}:
        if (folder / "grid.json").exists():
            grid = json.loads((folder / "grid.json").read_text())
    machine = origin.get("machine", "machine not recorded")
    made = f"meprop {origin['meprop']}" if "meprop" in origin else "meprop"
    if origin.get("commit"):
        made += f" (commit {origin['commit']})"
    threads = "" if "machine" in origin else f", {first['threads']} threads"
    # runs made on several machines: each named with how many runs it made (times compare
    # within one machine only)
    counts: dict[str, int] = {}
    for r in runs:
        m = r.extra.get("machine", "machine not recorded")
        counts[m] = counts.get(m, 0) + 1
    if len(counts) > 1:
        machine = "; ".join(f"{n} runs on {m}" for m, n in counts.items())
        made = "meprop " + ", ".join(
            sorted(
                {
                    f"{r.extra.get('meprop', '?')} (commit {r.extra.get('commit', '?')})"
                    for r in runs
                }
            )  # fmt: skip
        )
    hours = ""
    if "seconds" in grid:
        sec = grid["seconds"]
        span = f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.1f} min"
        hours = f"; grid time {span} (summed over its sittings and parallel processes)"
    lines = [
        "# meprop results",
        "",
        f"{len(runs)} runs, seeds {','.join(map(str, seeds))}; {machine}; torch "
        f"{first['torch']}{threads}; {made}{hours}.",
        "",
        "Scores are the test score of the checkpoint with the best dev score, as mean ± "
        "standard deviation over the seeds a row ran with (min-max beside). Every method uses "
        "the same shared settings (learning rate, dropout, batch size, epochs: the task's "
        "defaults); none is tuned per method. Times are per training step; speedups are "
        "against the dense run of the same optimizer, depth and dropout in this set (measured "
        "in the same grid, on the same machine).",
        "",
    ]
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
    lines += _claims_table(runs)
    lines += adaptive_section(runs, out)
    task = runs[0].config["task"]
    if task in PAPER:
        lines += [
            f"## Published figures (Sun et al., {PAPER_TITLES[task]}, hidden 500)",
            "",
            "| figure | paper |",
            "| --- | ---: |",
        ]
        lines += [f"| {k} | {v} |" for k, v in PAPER[task].items()]
        lines += [
            "",
            "The paper's speedups are against the authors' own dense code; ours are "
            "against PyTorch's dense kernels.",
            "",
        ]
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
