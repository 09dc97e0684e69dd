"""The ``meprop`` command line: one parser, with subcommands registered by their modules.

``meprop train TASK`` takes its options from ``TrainConfig``'s fields (one flag per field), or
from a JSON file (``--config``, e.g. a run's own ``config.json``) with flags overriding it.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from . import __version__, demo

CHOICES = {
    "method": ("dense", "meprop", "random", "kdim", "mesimp"),
    "mode": ("per_example", "unified"),
    "optimizer": ("adam", "adagrad", "sgd"),
    "dataset": ("mnist", "fashion"),
    "backend": ("auto", "torch", "numba"),
    "activation": ("relu", "tanh", "cube"),
    "tags": ("xpos", "upos"),
}
HELP = {
    "dataset": "MNIST-style dataset (mnist task)",
    "method": "dense | meprop (top-k) | random (random-k) | kdim (dense net of width k) | "
    "mesimp (meProp + simplification)",
    "k": "top-k kept per example (unified: per mini-batch)",
    "mode": "top-k selection: per example, or unified over the mini-batch",
    "hidden": "hidden width, or one width per layer: 500 or 154,160",
    "lr": "learning rate (0: adam 1e-3, adagrad 1e-2, sgd 0.1)",
    "eval_every": "steps between dev evaluations (0: once per epoch)",
    "train_limit": "use only the first N training examples (pos, parse: sentences; 0: all)",
    "prune_rate": "meSimp: drop units selected in fewer than this share of top-k selections",
    "prune_interval": "meSimp: steps between prunings (0: a quarter of an epoch)",
    "cycle": "meSimp cycle in epochs: SIMPLIFY,NORMAL (optimizer reset at each period start)",
    "sparse_grad": "row-sparse weight gradients (for SGD/Adagrad)",
    "backend": "kernels for the sparse backward: auto (numba where it applies), torch, numba",
    "activation": "hidden activation (default: the task's; mnist relu, parse cube)",
    "tags": "pos and parse tasks: tag column, xpos (Penn Treebank) or upos",
    "layers": "number of hidden layers when --hidden gives one width (0: the task's)",
    "batch_size": "mini-batch size (0: the task's; mnist 100 images, pos 16 sentences, parse "
    "1000 transitions)",
    "epochs": "training epochs (0: the task's)",
}


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag`` per dataclass field; defaults stay None so a --config file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        hint = hints[f.name]
        help_ = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        if hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=_int_tuple, default=None, metavar="N[,N...]", help=help_)
        else:
            parser.add_argument(
                flag, type=hint, default=None, choices=CHOICES.get(f.name), help=help_
            )


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """A ``cls`` from a base dict (a --config file) overridden by the flags that were given."""
    values = dict(base or {})
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)


def _train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, run

    base = json.loads(Path(args.config).read_text()) if args.config else {}
    base["task"] = args.task
    cfg = config_from_args(TrainConfig, args, base)
    out = args.out or Path("runs") / f"{cfg.task}-{cfg.method}-k{cfg.k}-seed{cfg.seed}"
    print(f"run directory: {out}")
    run(cfg, out, data_dir=args.data_dir, resume=args.resume, progress=not args.no_progress)


def register_train(subparsers) -> None:
    from .tasks import TASKS
    from .train import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train one model on one task with one method",
        description="Train, select the best epoch on dev, score it on test. Writes config.json, "
        "log.jsonl, last.pt, best.pt and summary.json to --out.",
        epilog="example: meprop train mnist --method meprop --k 20 --hidden 500 --layers 2 "
        "--epochs 20",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/TASK-METHOD-kK-seedS)")
    p.add_argument("--data-dir", type=Path, help="data root (default: $MEPROP_DATA, then cache)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p, TrainConfig, skip=("task",))
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    from . import report, reproduce

    parser = argparse.ArgumentParser(
        prog="meprop", description="meProp, meSimp and meAct: minimal effort back propagation."
    )
    parser.add_argument("--version", action="version", version=f"meprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (register_train, reproduce.register, report.register, demo.register):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
