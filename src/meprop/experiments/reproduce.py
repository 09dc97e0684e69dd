"""``meprop reproduce TASK``: run the grid behind the paper's tables, then write the report.

Each row of a results table is one ``TrainConfig``; its run directory holds ``config.json``
(rerun it alone with ``meprop train mnist --config .../config.json``) and ``row.json`` (the
table and label it belongs to). Finished rows are skipped, so an interrupted grid resumes; a
row's folder is reused only where its run has every setting of the row (the dataset, epochs
and training subset included): a run of other settings there (a --quick grid's, another
dataset's) is refused, naming what differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .grids import (  # noqa: F401 (PAPER* re-exported; add_grid_seconds, provenance too)
    PAPER,
    PAPER_MNIST,
    PAPER_PARSE,
    PAPER_POS,
    Row,
    add_grid_seconds,
    provenance,
    row_name,
)
from .train import TrainConfig

__all__ = [
    "Row", "GRIDS", "PAPER", "mnist_grid", "pos_grid", "parse_grid", "lm_grid", "run_grid",
    "with_seeds", "select_rows", "UsageError",
]  # fmt: skip


class _Grid:
    """Rows of one task's grid, added by (group, label, overrides of the base config)."""

    def __init__(self, base: TrainConfig) -> None:
        self.base = base
        self.rows: dict[str, Row] = {}

    def add(self, group: str, label: str, **kw) -> None:
        cfg = replace(self.base, **kw)
        name = row_name(cfg)
        self.rows.setdefault(name, Row(name, group, label, cfg))

    def list(self) -> list[Row]:
        return list(self.rows.values())


def mnist_grid(quick: bool = False, dataset: str = "mnist") -> list[Row]:
    """The MNIST grid: main comparison, k/h sweep, controls, meSimp, AdaGrad, depth, dropout."""
    g = _Grid(
        TrainConfig(
            task="mnist",
            dataset=dataset,
            epochs=2 if quick else 20,
            train_limit=10_000 if quick else 0,
        )
    )
    ks = (10, 40) if quick else (5, 10, 20, 40, 80, 160)
    g.add("main", "dense", method="dense")
    g.add("main", "meProp per_example k=20", method="meprop", k=20)
    g.add("main", "meProp unified k=20", method="meprop", k=20, mode="unified")
    for mode in ("per_example", "unified"):  # (k=20 is in the main table; the plot has all)
        for k in ks:
            g.add("ratio", f"meProp {mode} k={k}", method="meprop", k=k, mode=mode)
    g.add("control", "random-k k=20", method="random", k=20)
    g.add("control", "k-dim net k=20", method="kdim", k=20)
    # Per example with the sign balance kept (docs/per_example.md)
    g.add("symmetric", "meProp symmetric k=20", method="meprop", k=20, mode="symmetric")
    # Adaptive k under the bound 80 (the best fixed k of the ratio rows), against fixed k.
    bound = 40 if quick else 80
    for mode in ("per_example", "unified"):
        g.add("adaptive", f"meProp {mode} k={bound} (fixed)", method="meprop", k=bound, mode=mode)
        g.add("adaptive", f"meProp {mode} adaptive tinyprop, k <= {bound}", method="meprop",
              k=bound, mode=mode, adaptive="tinyprop", min_k=4)  # fmt: skip
    g.add("adaptive", f"meProp per_example adaptive mass 0.8, k <= {bound}", method="meprop",
          k=bound, adaptive="mass", min_k=4, mass_share=0.8)  # fmt: skip
    g.add("mesimp", "meSimp k=160 per_example", method="mesimp", k=160, prune_rate=0.1)
    # unified with the paper's cycle (5 epochs simplifying, 5 plain meProp, optimizer reset)
    g.add("mesimp", "meSimp k=160 unified, cycle 5+5", method="mesimp", k=160, mode="unified",
          prune_rate=0.1, cycle=(5, 5))  # fmt: skip
    g.add("adagrad", "dense AdaGrad", method="dense", optimizer="adagrad")
    g.add("adagrad", "meProp k=10 AdaGrad", method="meprop", k=10, optimizer="adagrad")
    # not in the paper: the same with memorized sparse back-propagation (MePropConfig.memory)
    g.add("adagrad", "meProp k=10 AdaGrad, memory 0.8", method="meprop", k=10,
          optimizer="adagrad", memory=0.8)  # fmt: skip
    for layers in (3,) if quick else (3, 4, 5):
        g.add("depth", f"dense {layers} layers", method="dense", layers=layers)
        g.add("depth", f"meProp unified k=20, {layers} layers", method="meprop", k=20,
              mode="unified", layers=layers)  # fmt: skip
    # Without dropout, per-example top-k training is unstable here (activations grow): shown.
    g.add("dropout", "dense, no dropout", method="dense", dropout=0.0)
    for mode in ("per_example", "unified"):
        g.add("dropout", f"meProp {mode} k=20, no dropout", method="meprop", k=20, mode=mode,
              dropout=0.0)  # fmt: skip
    # The shared settings (Adam's lr, dropout) chosen for dense on dev, the paper's protocol:
    # the grid's lr x dropout for dense (lr 0: Adam's default 1e-3; two of these are the
    # main and no-dropout dense rows above).
    for lr in (5e-4, 0.0, 2e-3):
        for dropout in (0.0, 0.1, 0.2):
            g.add("tuning", f"dense lr {lr or 1e-3:g}, dropout {dropout:g}", method="dense",
                  lr=lr, dropout=dropout)  # fmt: skip
    return g.list()


def _paper_rows(g: _Grid, k: int, mesimp_k: int, adagrad_k: int) -> None:
    """The rows the paper's POS and parsing tables share: dense vs meProp at k (both modes),
    random-k and a k-dimensional net, meSimp at mesimp_k, and AdaGrad (meProp at adagrad_k)."""
    g.add("main", "dense", method="dense")
    g.add("main", f"meProp per_example k={k}", method="meprop", k=k)
    g.add("main", f"meProp unified k={k}", method="meprop", k=k, mode="unified")
    g.add("control", f"random-k k={k}", method="random", k=k)
    g.add("control", f"k-dim net k={k}", method="kdim", k=k)
    g.add("mesimp", f"meSimp k={mesimp_k} per_example", method="mesimp", k=mesimp_k,
          prune_rate=0.1)  # fmt: skip
    g.add("adagrad", "dense AdaGrad", method="dense", optimizer="adagrad")
    g.add("adagrad", f"meProp k={adagrad_k} AdaGrad", method="meprop", k=adagrad_k,
          optimizer="adagrad")  # fmt: skip


def pos_grid(quick: bool = False, dataset: str = "") -> list[Row]:
    """The POS grid (bi-LSTM tagger on UD English EWT, XPOS): dense vs meProp k=10, the
    controls, meSimp, AdaGrad (meProp k=5, as the paper)."""
    g = _Grid(
        TrainConfig(
            task="pos",
            epochs=1 if quick else 10,
            train_limit=2000 if quick else 0,
            hidden=(128,) if quick else (500,),
        )
    )
    _paper_rows(g, k=10, mesimp_k=20, adagrad_k=5)
    return g.list()


def parse_grid(quick: bool = False, dataset: str = "") -> list[Row]:
    """The parsing grid (Chen & Manning's parser on UD English EWT, gold XPOS, the task's
    dropout 0.5 as theirs): dense vs meProp k=20, the controls, meSimp, AdaGrad (meProp k=20,
    as the paper).

    Without dropout meProp k=20 ends 3.8 UAS below dense here (test 83.0 vs 86.5); with it,
    0.1-0.3 below."""
    g = _Grid(
        TrainConfig(
            task="parse",
            epochs=2 if quick else 0,  # 0: the task's default
            train_limit=2000 if quick else 0,
            hidden=(200,) if quick else (500,),
        )
    )
    _paper_rows(g, k=20, mesimp_k=20, adagrad_k=20)
    # Adaptive k under the paper's k (the fixed row: main's per_example k=20)
    g.add("adaptive", "meProp per_example adaptive tinyprop, k <= 20", method="meprop", k=20,
          adaptive="tinyprop", min_k=2)  # fmt: skip
    # At the ~15% width meSimp reaches, dropout 0.5 costs accuracy: the row with 0.25 (and its
    # size control) shows how much.
    g.add("mesimp", "meSimp k=20, dropout 0.25", method="mesimp", k=20, prune_rate=0.1,
          dropout=0.25)  # fmt: skip
    # The shared settings chosen on dev for dense (Adam's lr 0: its default 1e-3; the lr 1e-3,
    # dropout 0.5 row is the main dense row's run)
    for lr in (5e-4, 0.0, 2e-3):
        for dropout in (0.25, 0.5):
            g.add("tuning", f"dense lr {lr or 1e-3:g}, dropout {dropout:g}", method="dense",
                  lr=lr, dropout=dropout)  # fmt: skip
    return g.list()


def lm_grid(quick: bool = False, dataset: str = "") -> list[Row]:
    """The language-model grid (byte-level transformer on UD English EWT's text, meProp on the
    MLP projections): dense, meProp unified at k = 1/8 and 1/4 of the MLP width and at 1/8 on
    mlp.fc only, per_example and random-k at 1/8, meSimp (unified, k = 1/8, both projections
    and mlp.fc only, and k = 1/4 and 1/2 on mlp.fc only; each with a dense model at its final
    MLP widths and d_model), dense at other learning rates (the "tuning" group, not in
    --quick). Dev bits per byte every ``eval_every`` steps: the loss curves against steps and
    seconds."""
    hidden = 128 if quick else 512
    g = _Grid(
        TrainConfig(
            task="lm",
            hidden=(hidden,),
            layers=2 if quick else 4,
            epochs=1 if quick else 2,
            train_limit=6000 if quick else 0,
            eval_every=15 if quick else 50,
        )
    )
    k8, k4 = hidden // 8, hidden // 4
    g.add("main", "dense", method="dense")
    g.add("main", f"meProp unified k={k8} (1/8)", method="meprop", k=k8, mode="unified")
    g.add("main", f"meProp unified k={k4} (1/4)", method="meprop", k=k4, mode="unified")
    # k counts MLP units only with mlp.proj dense (its output is d_model, not the MLP width)
    g.add("main", f"meProp unified k={k8} (1/8), mlp.fc only", method="meprop", k=k8,
          mode="unified", fc_only=True)  # fmt: skip
    g.add("main", f"meProp per_example k={k8} (1/8)", method="meprop", k=k8)
    g.add("control", f"random-k k={k8} (1/8)", method="random", k=k8)
    g.add("adaptive", f"meProp unified adaptive tinyprop, k <= {k4} (1/4)", method="meprop",
          k=k4, mode="unified", adaptive="tinyprop", min_k=max(1, k8 // 4))  # fmt: skip
    g.add("mesimp", f"meSimp unified k={k8} (1/8)", method="mesimp", k=k8, mode="unified",
          prune_rate=0.1)  # fmt: skip
    g.add("mesimp", f"meSimp unified k={k8} (1/8), mlp.fc only", method="mesimp", k=k8,
          mode="unified", prune_rate=0.1, fc_only=True)  # fmt: skip
    # unified selection counts about k units per layer, so meSimp ends near width k: at 1/4
    # and 1/2 the shrink is about 4x and 2x
    for k, frac in ((k4, "1/4"), (hidden // 2, "1/2")):
        g.add("mesimp", f"meSimp unified k={k} ({frac}), mlp.fc only", method="mesimp", k=k,
              mode="unified", prune_rate=0.1, fc_only=True)  # fmt: skip
    # Adam's lr chosen on dev for dense: the main dense row runs at the task's 4e-3
    # (tasks.ADAM_LR), these at the others
    if not quick:
        for lr in (1e-3, 2e-3, 8e-3):
            g.add("tuning", f"dense lr {lr:g}", method="dense", lr=lr)
    return g.list()


GRIDS = {"mnist": mnist_grid, "pos": pos_grid, "parse": parse_grid, "lm": lm_grid}


def meact_grid(quick: bool = False, dataset: str = "mnist") -> list[Row]:
    """The meAct analysis on MNIST: dense vs meAct from the same seed (``meprop.experiments.meact_report``)."""
    from . import meact_report

    return meact_report.grid(quick=quick, dataset=dataset)


GRIDS["meact"] = meact_grid


def tta_grid(quick: bool = False, dataset: str = "mnist") -> list[Row]:
    """Time to accuracy: dense and meProp recipes side by side (``meprop.experiments.tta``;
    the rows: ``tta_rows``)."""
    from .tta_rows import tta_grid as rows

    return rows(quick=quick, dataset=dataset)


GRIDS["tta"] = tta_grid


# training batches (of 50: 5,000 images) the ResNet's precise-BN rows recompute BatchNorm from
PRECISE_BN = 100


def cnn_grid(quick: bool = False, dataset: str = "mnist") -> list[Row]:
    """Convolutional networks on MNIST (or Fashion-MNIST, ``--dataset fashion``): LeNet-5 and a
    small ResNet (``tasks.cnn``), dense against meProp unified and per_example at k = 1/8 and
    1/16 of the channels, random-k at 1/8, per_position at 1/8 (k channels at each output
    position; the linear layers per example) without and with memory 0.8, and meSimp
    per_example at 1/4 (the paper's MNIST meSimp keeps 160 of 500); the ResNet also dense and
    meProp at 1/8 with precise BN (``bn_batches``: BatchNorm statistics recomputed over
    ``PRECISE_BN`` training batches before each evaluation), and meProp on the blocks' first
    convolutions only (``inner_only``) at 1/8 and 1/16. (``--k`` counts the widest
    convolution's channels: LeNet's 16, the ResNet's 64.) ``--quick``: LeNet, 2000 images, 2
    epochs."""
    rows: list[Row] = []
    for model, widest, epochs in (("lenet", 16, 10), ("resnet", 64, 5)):
        if quick and model == "resnet":
            continue
        g = _Grid(TrainConfig(task="mnist", dataset=dataset, model=model,
                              epochs=2 if quick else epochs,
                              train_limit=2000 if quick else 0))  # fmt: skip
        g.add(model, "dense", method="dense")
        for share, k in (("1/8", widest // 8), ("1/16", widest // 16)):
            for mode in ("unified", "per_example"):
                g.add(model, f"meProp {mode} k={k} ({share})", method="meprop", k=k, mode=mode)
        g.add(model, f"random-k k={widest // 8} (1/8)", method="random", k=widest // 8)
        g.add(model, f"meProp per_position k={widest // 8} (1/8)", method="meprop",
              k=widest // 8, mode="per_position")  # fmt: skip
        # with memorized sparse back-propagation (MePropConfig.memory), issue 27's lever
        g.add(model, f"meProp per_position k={widest // 8} (1/8), memory 0.8", method="meprop",
              k=widest // 8, mode="per_position", memory=0.8)  # fmt: skip
        g.add(model, f"meSimp per_example k={widest // 4} (1/4)", method="mesimp",
              k=widest // 4, prune_rate=0.1)  # fmt: skip
        if model == "resnet":  # BatchNorm statistics recomputed before each evaluation
            pbn = dict(bn_batches=PRECISE_BN)
            g.add(model, "dense, precise BN", method="dense", **pbn)
            for mode in ("unified", "per_example"):
                g.add(model, f"meProp {mode} k={widest // 8} (1/8), precise BN",
                      method="meprop", k=widest // 8, mode=mode, **pbn)  # fmt: skip
            # meProp on each block's first convolution only (inner_only): the residual sum's
            # writers (stem, second convolutions, shortcuts) dense
            for share, k, mode in (("1/8", widest // 8, "unified"),
                                   ("1/8", widest // 8, "per_example"),
                                   ("1/16", widest // 16, "unified")):  # fmt: skip
                g.add(model, f"meProp {mode} k={k} ({share}), inner convs, precise BN",
                      method="meprop", k=k, mode=mode, inner_only=True, **pbn)  # fmt: skip
        rows += g.list()  # (row names start with the model: lenet-..., resnet-...)
    return rows


GRIDS["cnn"] = cnn_grid


def _size_control(row: Row, summary: dict) -> Row:
    """A dense net trained from scratch at the widths a meSimp run ended with (same seed and
    settings; the lm task's d_model is the run's)."""
    from .tasks import task_class

    task = task_class(row.config.task)
    hidden = task.dense_hidden(summary["final_widths"])
    # what else the task keeps from the run (lm: d_model); dense places no meProp layers
    kept = getattr(task, "dense_settings", lambda cfg: {})(row.config)
    cfg = replace(
        row.config, method="dense", hidden=hidden, layers=0, k=20, fc_only=False,
        sparse_attention=False, **kept,
    )  # fmt: skip
    name = f"dense-size-of-{row.name}"
    return Row(name, "mesimp", f"dense at the widths of {row.label}", cfg)


def with_seeds(rows: list[Row], seeds: list[int], groups: list[str] | None = None) -> list[Row]:
    """Each row once per seed (the rows of ``groups`` only, when given; the others keep their
    own seed). A row's seed-1 run keeps the row's name, so grids run before seeds existed are
    reused; other seeds add ``-s<seed>``."""
    out = []
    for row in rows:
        if groups is not None and row.group not in groups:
            out.append(row)
            continue
        for seed in seeds:
            name = row.name if seed == 1 else f"{row.name}-s{seed}"
            out.append(replace(row, name=name, config=replace(row.config, seed=seed)))
    return out


def check_reuse(row: Row, d: Path, extend: bool = False) -> bool:
    """Whether the run folder ``d`` may serve ``row``: True where it holds a run of exactly the
    row's settings (every TrainConfig field, the dataset and epochs included; finished or to be
    resumed), or with ``extend`` (``reproduce --epochs``) all of them but fewer epochs and its
    checkpoint (to be extended); False where it holds none; ``RunDirError`` naming the settings
    that differ where it holds another run (a --quick grid's, another dataset's), which is
    never reused. Reads only."""
    from .rundir import RunDirError, describe_diff, settings_diff
    from .train import ConfigError, TrainConfig

    cfg_path = d / "config.json"
    if not cfg_path.exists():
        if (d / "summary.json").exists() or (d / "last.pt").exists():
            raise RunDirError(
                f"{d} holds a run without its config.json: its settings cannot be compared with "
                f"the row {row.label!r}: remove that folder, or give another --out"
            )
        return False
    try:
        saved = TrainConfig.from_file(cfg_path).to_dict()
    except ConfigError as e:
        raise RunDirError(
            f"{e}; so it cannot serve the row {row.label!r}: remove {d}, or give another --out"
        ) from None
    want = row.config.to_dict()
    diff = settings_diff(saved, want)
    try:  # the finished run's own record of its settings (a summary.json copied in: refused)
        summary = json.loads((d / "summary.json").read_text())
        done = TrainConfig.from_dict(summary["config"]).to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        done = None  # no summary yet (or a damaged one: the run is resumed and writes it anew)
    if done is not None and not diff:  # (config.json of an extension under way: the summary's)
        diff = settings_diff(done, want)
    if extend and set(diff) == {"epochs"} and diff["epochs"][0] < diff["epochs"][1]:
        if (d / "last.pt").exists():
            return True  # fewer epochs, and the checkpoint to go on from: extended
        raise RunDirError(
            f"{d} holds a run of {diff['epochs'][0]} epochs without its checkpoint (last.pt), "
            f"so it cannot be extended to the {diff['epochs'][1]} of the row {row.label!r}: "
            "remove that folder to run the row again, or leave out --epochs"
        )
    if diff:
        raise RunDirError(
            f"{d} holds a run of other settings than the grid's row {row.label!r} "
            f"({describe_diff(diff, 'there', 'in the grid')}): it is not reused; give another "
            "--out (one results folder per grid: --quick, --dataset), or remove that folder to "
            "run the row again"
        )
    return True


def _finished(summary, row: Row) -> bool:
    """Whether a run's summary.json (parsed, or None) is of the row's whole training: an
    extended run's earlier summary is not."""
    if not isinstance(summary, dict):
        return False
    config = summary.get("config")
    return not isinstance(config, dict) or config.get("epochs") == row.config.epochs


def run_grid(
    rows: list[Row], out: Path, data_dir=None, progress=True, echo=print, extend=False
) -> list[Path]:
    """Run every row not finished yet (and, after each meSimp row, a dense net at its final
    widths); the grid's time over all sittings accumulates in ``out/grid.json`` (summed over
    processes where several run disjoint rows of one grid at once).

    A row's folder that holds a run is reused (skipped when finished, resumed otherwise) only
    where that run has every setting of the row (``check_reuse``), or with ``extend`` all but
    fewer epochs, with its checkpoint (extended: ``reproduce --epochs``); any other is refused,
    every row checked before the first one runs."""
    from .train import run

    for row in rows:
        check_reuse(row, out / "runs" / row.name, extend)
    dirs = []
    queue = list(rows)
    grid_path = out / "grid.json"
    t0 = last = time.perf_counter()
    i = 0
    origin = provenance()
    while queue:
        row = queue.pop(0)
        i += 1
        d = out / "runs" / row.name
        dirs.append(d)
        summary_path = d / "summary.json"
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            summary = None  # not finished (or a damaged summary: the resume writes it again)
        if check_reuse(row, d, extend) and _finished(summary, row):
            echo(
                f"[{i}] {row.label} (seed {row.config.seed}): done already, with every setting "
                f"of the row: reused ({d})"
            )
        else:
            echo(f"[{i}/{i + len(queue)}] {row.label} (seed {row.config.seed})  ->  {d}")
            d.mkdir(parents=True, exist_ok=True)
            info = {"group": row.group, "label": row.label, "seed": row.config.seed, **origin}
            (d / "row.json").write_text(json.dumps(info) + "\n")
            run(
                row.config,
                d,
                data_dir=data_dir,
                resume=(d / "log.jsonl").exists(),
                progress=progress,
                echo=lambda s: echo("    " + s),
            )
            now = time.perf_counter()
            add_grid_seconds(grid_path, now - last)
            last = now
            summary = json.loads(summary_path.read_text())
        if row.config.method == "mesimp" and summary.get("final_widths"):
            queue.append(_size_control(row, summary))
    echo(f"grid finished in {time.perf_counter() - t0:.0f} s")
    return dirs


class UsageError(ValueError):
    """A ``reproduce`` flag that selects nothing or does not apply; the message names it."""


def select_rows(args: argparse.Namespace) -> list[Row]:
    """The rows that ``meprop reproduce`` runs for its parsed flags (task, --quick, --dataset,
    --groups, --rows, --epochs, --seeds, --seed-groups); ``UsageError`` where a flag selects no
    row or does not apply."""
    rows = GRIDS[args.task](quick=args.quick, dataset=args.dataset)
    if args.groups:
        known = sorted({r.group for r in rows})
        bad = [g for g in args.groups if g not in known]
        if bad:
            raise UsageError(
                f"--groups {','.join(bad)}: no such group; the {args.task} grid has "
                f"{','.join(known)}"
            )
        rows = [r for r in rows if r.group in args.groups]
    if args.rows:
        # a whole label (labels may contain commas: "..., mlp.fc only"), else comma-separated
        # parts of labels
        exact = [r for r in rows if r.label == args.rows]
        parts = [t for t in args.rows.split(",") if t]
        rows = exact or [r for r in rows if any(part in r.label for part in parts)]
        if not rows:
            raise UsageError(f"--rows {args.rows}: matches no row label of the {args.task} grid")
    if args.epochs is not None:
        if args.task == "tta":
            raise UsageError(
                "--epochs: the tta groups set each recipe's epochs (a time to accuracy is "
                "judged within them); leave it out"
            )
        rows = [replace(r, config=replace(r.config, epochs=args.epochs)) for r in rows]
    # (a time to accuracy is judged over seeds, never one)
    seeds = args.seeds or ([1, 2, 3] if args.task == "tta" else None)
    return with_seeds(rows, seeds, args.seed_groups) if seeds else rows


def _reproduce(args: argparse.Namespace) -> None:
    try:
        rows = select_rows(args)
    except UsageError as e:
        print(f"meprop reproduce: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = args.out or Path("results") / (f"{args.task}-quick" if args.quick else args.task)
    mesimp = any(r.config.method == "mesimp" for r in rows)
    control = " (+1 dense size control per meSimp run)" if mesimp else ""
    print(
        f"{len(rows)} runs{control}, {PER_RUN[args.task][args.quick]} "
        f"each on 2 cores; results in {out}"
    )
    if args.task == "tta":  # side by side: interleaved epoch by epoch, its own report
        from .tta import build_tta_report, run_interleaved

        run_interleaved(rows, out, data_dir=args.data_dir)
        report = build_tta_report([out], out)  # every group in the folder (its own command)
    else:
        from .report import build_report

        dirs = run_grid(
            rows, out, data_dir=args.data_dir, progress=not args.no_progress,
            extend=args.epochs is not None,
        )  # fmt: skip
        report = build_report(dirs, out)
    print(f"report: {report}")


# Measured wall time of one run of each grid on 2 cores: (full, quick).
PER_RUN = {
    "mnist": ("about 1-3 min", "about 10 s"),
    "pos": ("about 30-60 min", "about 1 min"),
    "parse": ("about 5-20 min", "about 30 s"),
    "lm": ("about 3-5 min", "about 15 s"),
}
PER_RUN["meact"] = ("about 2 min", "about 3 min")
PER_RUN["cnn"] = ("about 3-10 min (LeNet), 10-30 min (ResNet)", "about 30 s")
PER_RUN["tta"] = ("about 1-6 min (MNIST width 500-2000), 5-15 min (parse, lm)", "about 10 s")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="run the paper's experiment grid for a task and write the report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", choices=tuple(GRIDS))
    p.add_argument(
        "--quick", action="store_true", help="a few minutes: fewer epochs and rows, a data subset"
    )
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion"), help="mnist task")
    p.add_argument("--out", type=Path, help="results folder (default: results/TASK[-quick])")
    p.add_argument("--data-dir", type=Path, help="data root (default: $MEPROP_DATA, then cache)")
    p.add_argument(
        "--seeds",
        type=_int_list,
        help="run each row once per seed, e.g. 1,2,3 (default: each row's own seed, 1); the "
        "report then shows mean ± sd over seeds and paired comparisons for the paper's claims",
    )
    p.add_argument(
        "--seed-groups",
        type=lambda t: [g for g in t.split(",") if g],
        help="with --seeds: only the rows of these groups (e.g. main,control,mesimp); the "
        "others run once",
    )
    p.add_argument(
        "--groups",
        type=lambda t: [g for g in t.split(",") if g],
        help="run only the rows of these groups (e.g. main,control,mesimp; default: all)",
    )
    p.add_argument(
        "--rows",
        help="run only the rows whose label contains one of these comma-separated texts (e.g. "
        "'k=40,k=80'), or the one row whose label is the whole text (labels may hold commas)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        help="train every row this many epochs instead of the grid's; a run of the folder "
        "with fewer epochs and its checkpoint (last.pt) is extended, as 'meprop train "
        "--resume --epochs' extends a run (not for tta)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_reproduce)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return values
