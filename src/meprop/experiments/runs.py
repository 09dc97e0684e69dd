"""The finished runs a report reads: each run folder's ``config.json``, ``summary.json``,
``log.jsonl`` and (if present) ``row.json`` as one ``Run``; the runs that repeat a row with
other seeds (``replicates``), and the dense run each is compared with (``reference``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Run", "ReportError", "scan_runs", "load_runs", "replicates", "reference", "distinct_rows",
    "label",
]  # fmt: skip


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


def label(cfg: dict) -> str:
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
    run = Run(d, cfg, summary, log, row.get("group", "runs"), row.get("label", label(cfg)), row)
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
    runs, more = distinct_rows(runs)
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


def distinct_rows(runs: list[Run]) -> tuple[list[Run], list[str]]:
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


def reference(run: Run, runs: list[Run]) -> Run | None:
    """The dense run this run's times are compared with (same network, optimizer, depth,
    dropout)."""

    def model(r: Run) -> tuple[str, str]:
        return r.config["task"], r.config.get("model", "mlp")  # (runs before --model: the MLP)

    def key(r: Run):
        c = r.config
        return (
            model(r), c["optimizer"], len(r.summary["widths"]), c["dropout"], c["dataset"],
            c.get("batch_size"), c.get("train_limit"), c.get("epochs"), c.get("eval_every"),
        )  # fmt: skip

    # the full-size dense runs of the same network (not the dense nets trained at meSimp's
    # widths)
    dense = [r for r in runs if r.method == "dense" and model(r) == model(run)]
    widest = max((max(r.summary["widths"]) for r in dense), default=0)
    dense = [r for r in dense if max(r.summary["widths"]) == widest]
    # (a dense row is compared with the main one at any lr: the tuning rows' lr is their point)
    same = [
        r
        for r in dense
        if key(r) == key(run) and (run.method == "dense" or r.config["lr"] == run.config["lr"])
    ]
    return (same or [None])[0]  # none measured alike: no speedup shown
