"""The rows of ``meprop reproduce tta`` (``meprop.experiments.tta`` runs and reports them):
the recipes compared with dense, grouped by task, width and question (``mnist-w500``,
``mnist-w1000``, ``mnist-w2000``, ``mnist-w500-levers``, ``mnist-w500-confirm``,
``mnist-w500-k20``, ``mnist-w500-more``, ``mnist-w500-mesimp``, ``parse``, ``lm``,
``lm-time``). Each group is one interleaved run per seed: its recipes are timed side by side.
"""

from __future__ import annotations

from dataclasses import replace

from .grids import Row, row_name
from .train import TrainConfig

__all__ = ["EVALS_PER_EPOCH", "MNIST_EPOCHS", "tta_grid"]

EVALS_PER_EPOCH = 10
# MNIST: epochs per width (the paper's 20 at 500; wider nets reach their best sooner and cost
# more per epoch)
MNIST_EPOCHS = {500: 10, 1000: 5, 2000: 3}


def tta_grid(quick: bool = False, dataset: str = "mnist") -> list[Row]:
    """The recipes, per MNIST width: dense; meProp per example with memory at k = 4% of the
    width (the paper's 20 of 500) and, at width 500, 8%; unified at 16% (the fastest to
    accuracy without memory, benchmarks/bench_time_to_accuracy.py), with Adam and with
    LazyAdam (Adam on the kept rows only), and, at width 500, at 8% with memory. (Wider nets:
    fewer recipes and epochs, each epoch costing more.)

    Seed 1 only: ``meprop reproduce tta`` runs them with seeds 1, 2, 3 unless ``--seeds``
    says otherwise."""
    rows: list[Row] = []
    widths = (500,) if quick else tuple(MNIST_EPOCHS)
    for width in widths:
        group = f"mnist-w{width}"
        base = _mnist_base(width, dataset, quick)
        k16, k8, k4 = width * 16 // 100, width * 8 // 100, width * 4 // 100

        def add(label: str, base=base, group=group, **kw) -> None:
            rows.extend(_group_rows(group, [(label, replace(base, **kw))]))

        add("dense")
        for k in (k4, k8) if width == 500 else (k4,):
            add(f"meProp per_example k={k}, memory 0.8", method="meprop", k=k, memory=0.8)
        add(f"meProp unified k={k16}", method="meprop", mode="unified", k=k16)
        # the whole step: Adam on the kept rows only (meprop.LazyAdam, row-sparse gradients)
        add(f"meProp unified k={k16}, LazyAdam", method="meprop", mode="unified", k=k16,
            optimizer="lazy_adam", sparse_grad=True)  # fmt: skip
        if width == 500:
            add(f"meProp unified k={k8}, memory 0.8", method="meprop", mode="unified", k=k8,
                memory=0.8)  # fmt: skip
    if not quick:
        rows += _levers_rows(dataset) + _confirm_rows(dataset) + _k20_rows(dataset)
        rows += _more_rows(dataset) + _mesimp_rows(dataset)
        rows += _parse_rows() + _lm_rows() + _lm_time_rows()
    return rows


def _mnist_base(width: int, dataset: str, quick: bool = False) -> TrainConfig:
    """Dense MNIST at hidden width ``width`` (two layers), the epochs of ``MNIST_EPOCHS``, dev
    ``EVALS_PER_EPOCH`` times an epoch (``quick``: 2000 images, 2 epochs)."""
    epoch = 55_000 // 50 if not quick else 2000 // 50  # steps (training split 55k, batch 50)
    return TrainConfig(
        task="mnist",
        dataset=dataset,
        method="dense",
        hidden=(width,),
        epochs=2 if quick else MNIST_EPOCHS[width],
        train_limit=2000 if quick else 0,
        eval_every=max(1, epoch // EVALS_PER_EPOCH),
    )


def _confirm_rows(dataset: str) -> list[Row]:
    """The two recipes of ``mnist-w500-levers`` that reached dense's best - 0.2 point soonest
    (unified k=160 and TinyProp k <= 160, both with LazyAdam), with dense, as a group of their
    own: run on seeds none of the grids had seen (``--seeds 6,7,8``), to confirm them."""
    rows = {r.label: r.config for r in _levers_rows(dataset)}
    return _group_rows("mnist-w500-confirm", [
        (label, rows[label]) for label in
        ("dense", "meProp unified k=160, LazyAdam", "meProp unified TinyProp k <= 160, LazyAdam")
    ])  # fmt: skip


def _k20_rows(dataset: str) -> list[Row]:
    """The paper's k=20 (4% of 500) per example, with the levers that keep its accuracy:
    memory 0.8, the sign-balanced selection (``symmetric``), and both; with dense. 10 epochs,
    as ``mnist-w500``."""
    base = _mnist_base(500, dataset)
    k20 = replace(base, method="meprop", k=20)
    return _group_rows("mnist-w500-k20", (
        ("dense", base),
        ("meProp per_example k=20, memory 0.8", replace(k20, memory=0.8)),
        ("meProp symmetric k=20", replace(k20, mode="symmetric")),
        ("meProp symmetric k=20, memory 0.8", replace(k20, mode="symmetric", memory=0.8)),
    ))  # fmt: skip


def _more_rows(dataset: str) -> list[Row]:
    """Two levers the levers group left out, at width 500 with LazyAdam, beside dense and the
    mnist recipe (unified k=160): meSimp unified k=160 (cycle 5+5) with memory 0.8 (memory
    kept the paper's k=20 level with dense), and adaptive k by the mass rule (each step the
    fewest columns holding 80% of the summed |g|, k <= 160)."""
    lazy = {r.label: r.config for r in _levers_rows(dataset)}
    recipe = lazy["meProp unified k=160, LazyAdam"]
    return _group_rows("mnist-w500-more", (
        ("dense", lazy["dense"]),
        ("meProp unified k=160, LazyAdam", recipe),
        ("meSimp unified k=160, cycle 5+5, LazyAdam, memory 0.8",
         replace(lazy["meSimp unified k=160, cycle 5+5, LazyAdam"], memory=0.8)),
        ("meProp unified mass 0.8, k <= 160, LazyAdam",
         replace(recipe, adaptive="mass", min_k=4, mass_share=0.8)),
    ))  # fmt: skip


def _mesimp_rows(dataset: str) -> list[Row]:
    """meSimp at width 500 with more of each layer kept (the forward pass is the step's largest
    part meProp leaves, and meSimp is the one lever on it): ``mnist-w500-levers`` had meSimp
    unified k=160 at the cheapest step (0.54x dense's; it ended at 155 and 174 units) but 1.3x
    dense's steps. Here k=240 and k=320 (48% and 64%, cycle 5+5, LazyAdam), with dense: does a
    net that shrinks less need fewer extra steps, and more than pay for its dearer step?"""
    lazy = {r.label: r.config for r in _levers_rows(dataset)}
    mesimp = lazy["meSimp unified k=160, cycle 5+5, LazyAdam"]
    return _group_rows("mnist-w500-mesimp", (
        ("dense", lazy["dense"]),
        ("meSimp unified k=240, cycle 5+5, LazyAdam", replace(mesimp, k=240)),
        ("meSimp unified k=320, cycle 5+5, LazyAdam", replace(mesimp, k=320)),
    ))  # fmt: skip


def _levers_rows(dataset: str) -> list[Row]:
    """The levers of the whole step at width 500, each with LazyAdam (the mnist recipe's
    optimizer): unified k=80 (the recipe) alone, after a dense warm-up of one epoch (1100
    steps), at k=160 (32%), with adaptive k (TinyProp, k <= 160), and meSimp unified k=160 with
    the paper's cycle (5 epochs simplifying, 5 plain), the one lever on the forward pass.
    10 epochs, dev ten times per epoch, as ``mnist-w500``."""
    base = _mnist_base(500, dataset)
    lazy = replace(base, method="meprop", mode="unified", k=80, optimizer="lazy_adam",
                   sparse_grad=True)  # fmt: skip
    return _group_rows("mnist-w500-levers", (
        ("dense", base),
        ("meProp unified k=80, LazyAdam", lazy),
        ("meProp unified k=80, LazyAdam, dense warm-up 1 epoch", replace(lazy, warmup=1100)),
        ("meProp unified k=160, LazyAdam", replace(lazy, k=160)),
        ("meProp unified TinyProp k <= 160, LazyAdam",
         replace(lazy, k=160, adaptive="tinyprop", min_k=4)),
        ("meSimp unified k=160, cycle 5+5, LazyAdam",
         replace(lazy, method="mesimp", k=160, prune_rate=0.1, cycle=(5, 5))),
    ))  # fmt: skip


def _parse_rows() -> list[Row]:
    """The parser (hidden 500, cube, dropout 0.5, Adam; its backward is 60% of a dense step):
    dense, meProp per example at the paper's k=20, with and without memory. Dense trains 5
    epochs (half the task's 10: dense's best is its best within them); meProp 7, which take
    less training time than dense's 5 (its step costs about half of dense's: 80-91 against
    170 ms in the grid), so that a recipe is not cut off before it had dense's time. Dev 4
    times per epoch."""
    base = TrainConfig(task="parse", method="dense", epochs=5, eval_every=98)
    return _group_rows("parse", (
        ("dense", base),
        ("meProp per_example k=20", replace(base, method="meprop", k=20, epochs=7)),
        ("meProp per_example k=20, memory 0.8",
         replace(base, method="meprop", k=20, memory=0.8, epochs=7)),
    ))  # fmt: skip


# The lm grid's LM (4 blocks, MLP width 512), dense, 2 epochs, dev every 25 steps
_LM_BASE = TrainConfig(task="lm", method="dense", hidden=(512,), layers=4, epochs=2, eval_every=25)


def _lm_rows() -> list[Row]:
    """The byte-level LM (the lm grid's: 4 blocks, MLP width 512, 2 epochs): dense, meProp
    unified at k = 1/8 of the MLP width with and without memory. Dev every 25 steps."""
    meprop = replace(_LM_BASE, method="meprop", mode="unified", k=64)
    return _group_rows("lm", (
        ("dense", _LM_BASE),
        ("meProp unified k=64 (1/8)", meprop),
        ("meProp unified k=64 (1/8), memory 0.8", replace(meprop, memory=0.8)),
    ))  # fmt: skip


def _lm_time_rows() -> list[Row]:
    """The LM with each recipe given about dense's training time (the ``lm`` group gives every
    recipe dense's steps, and meProp's steps are cheaper): dense (2 epochs); meProp unified
    k = 1/8, 3 epochs (its step costs about 0.77 of dense's in the lm grid: 308 against
    400 ms, so 3 epochs take about 1.15x dense's 2); meSimp unified k = 1/2 on mlp.fc only, the
    lm grid's closest recipe to dense (dev bpb +1.9% after 2 epochs), 2 epochs (its step
    shrinks with the net: 0.85 of dense's). Dev every 25 steps."""
    return _group_rows("lm-time", (
        ("dense", _LM_BASE),
        ("meProp unified k=64 (1/8), 3 epochs",
         replace(_LM_BASE, method="meprop", mode="unified", k=64, epochs=3)),
        ("meSimp unified k=256 (1/2), mlp.fc only",
         replace(_LM_BASE, method="mesimp", mode="unified", k=256, prune_rate=0.1,
                 fc_only=True)),
    ))  # fmt: skip


def _group_rows(group: str, recipes) -> list[Row]:
    """A group's rows from its (label, config) recipes, each named after the group."""
    return [Row(f"{group}-{row_name(cfg)}", group, label, cfg) for label, cfg in recipes]
